"""Fine-tuning at equal task budget (issue 37, item 4): the automatic fine-tune from the project's own weights
against the from-scratch recipe, `--preset finetune`, a plain timm loop and a torchvision ResNet-18.

No published weights can be downloaded here, so the sources are made with the project itself, on CIFAR-10
(`../shared/data/cifar10-jpg.tar`) at 64 px, `--source-min` minutes each:

- `convnext train --data CIFAR --img-size 64 --model convnext_atto`: the supervised source, then written in the
  layouts users bring: the run folder as is, timm's layout as `.pth` and `.safetensors` (`convnext convert --to
  timm`, from the run's best.pt: the weights the run folder resolves to) and a transformers folder (`--to hf`);
- `convnext pretrain --data CIFAR --img-size 64 --model convnext_atto`: the FCMAE source;
- torchvision's ResNet-18 trained on the same images in the plain loop below: the peer's source.

Targets: CamVid patches at 64 and 128 px and Penn-Fudan crops (built by `folder_vs_resnet18.py`), and 10% of
CIFAR-10's training images (500 a class, seeded) scored on its 10,000 test images. Rows, each trained in its own
process for `--budget-min` minutes of training and scored with top-1 of its final weights on the target's
held-out images:

  auto-ft          `convnext train --data T --model SOURCE` (no preset: the automatic recipe); SOURCE is the run
                   folder, and with `--layouts all` also the timm .pth / .safetensors (`--model convnext_atto
                   --model.checkpoint FILE`) and the HF folder
  auto-ft-fcmae    `convnext train --data T --model FCMAE_RUN`
  scratch          `convnext train --data T --model convnext_atto`: the automatic from-scratch recipe
  preset-finetune  `convnext train --data T --preset finetune --model convnext_atto --model.checkpoint TIMM.pth`
  timm             `timm.create_model("convnext_atto", pretrained=True, pretrained_cfg_overlay=dict(file=TIMM.pth))`
                   in the plain loop
  resnet18         the ResNet-18 source, its head replaced, in the plain loop

The plain loop (timm, resnet18 and the ResNet-18 source): images held in memory as PIL, torchvision's
RandomResizedCrop(S, area 35-100%) + flip, batch 64, AdamW (wd 0.05), 5% linear warmup then a cosine to zero at the
budget, label smoothing 0.1; the budget and the schedule count the training steps' own time; scored after a resize
to S/0.875 and a centre crop of S. S is the image size the auto-ft row chose for that target. Fine-tuning lr
`--peer-lr` (default 1e-4, timm's usual fine-tuning lr with AdamW); the ResNet-18 source trains from scratch at 1e-3.
timm's row normalises with timm's data config for the model (ImageNet's mean/std), ResNet-18 with ImageNet's.

Every step is kept in `--work` (run folders, files, a `row.json` per scored row), so an interrupted benchmark
continues where it stopped; folders are named by their budgets. The table (target x row, top-1, with the spread
max-min where there are two seeds) is printed and written to `benchmarks/results/finetune-<host>-<date>.md` and
`.json`, with the CPU, the threads and each row's recipe.

    python benchmarks/finetune.py                                  # 3 min a row, 10 min a source, seed 0
    python benchmarks/finetune.py --seeds 0,1 --layouts all --budget-min 5
    python benchmarks/finetune.py --targets camvid64 --rows auto-ft,timm
    python benchmarks/finetune.py --fcmae-min 1,6 --rows auto-ft,auto-ft-fcmae,scratch   # the FCMAE curve
    python benchmarks/finetune.py --quick                          # smoke run: tiny budgets and data, one target
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from convnext.cli import main as convnext_main
from convnext.cli.core import system_info
from convnext.constants import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TARGETS = ("camvid64", "camvid128", "pennfudan", "cifar10-10pct")
ROWS = ("auto-ft", "auto-ft-fcmae", "scratch", "preset-finetune", "timm", "resnet18")
LAYOUTS = ("run", "timm-pth", "timm-safetensors", "hf")
PEERS = ("timm", "resnet18")
SOURCE_LR = 1e-3  # the ResNet-18 source, from scratch (folder_vs_resnet18.py's loop)


def sibling(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the folder holds scripts, not a package)."""
    key = f"benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


# ------------------------------------------------------------------------------------------------ data


def unpack(tar: Path, dest: Path, per_folder: int | None = None) -> Path:
    """`tar` unpacked into `dest` once (`dest`/.done marks it finished); with `per_folder`, only the first
    `per_folder` files of each folder in the tar's order (a smoke run's slice). Returns `dest`."""
    done = dest / ".done"
    if done.is_file():
        return dest
    if not tar.is_file():
        raise FileNotFoundError(f"{tar}: not found (pass --shared, the folder holding the shared tars)")
    dest.mkdir(parents=True, exist_ok=True)
    kept: Counter[str] = Counter()
    with tarfile.open(tar) as t:
        for member in t:
            if per_folder is not None and member.isfile():
                folder = str(Path(member.name).parent)
                kept[folder] += 1
                if kept[folder] > per_folder:
                    continue
            t.extract(member, dest, filter="data")
    done.write_text(f"{tar} {per_folder or 'all'}\n")
    return dest


def split_dir(folder: Path, split: str) -> Path:
    """`folder`/train, or its held-out split: val/ (or validation/, test/)."""
    names = ("train",) if split == "train" else ("val", "validation", "test")
    found = next((folder / n for n in names if (folder / n).is_dir()), None)
    if found is None:
        raise FileNotFoundError(f"{folder}: no {' or '.join(n + '/' for n in names)} folder")
    return found


def build_target(name: str, work: Path, shared: Path, cifar: Path, quick: bool) -> Path:
    """The target folder `name` (one of TARGETS) under `work`/targets, built once (in a .partial folder first)."""
    out = work / "targets" / name
    if out.is_dir():
        return out
    partial = out.with_name(name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    photos = sibling("folder_vs_resnet18")
    if name.startswith("camvid"):
        camvid = unpack(shared / "camvid.tar", work / "data" / "camvid") / "CamVid"
        per_train, per_val = (12, 8) if quick else (1000, 300)
        photos.make_camvid_patches(camvid, partial, side=int(name[len("camvid") :]), per_train=per_train,
                                   per_val=per_val)  # fmt: skip
    elif name == "pennfudan":
        photos.make_pedestrian_crops(unpack(shared / "pennfudan.tar", work / "data" / "pennfudan") / "PennFudanPed",
                                     partial)  # fmt: skip
    elif name == "cifar10-10pct":  # 10% of the training images, stratified and seeded; all test images scored
        sibling("fcmae_cifar10").labelled_subset(cifar, partial, per_class=5 if quick else 500, seed=0)
    else:
        raise ValueError(f"unknown target {name!r} ({', '.join(TARGETS)})")
    partial.rename(out)
    return out


# ----------------------------------------------------------------------------------- the plain loop (peers)


def peer_model(arch: str, classes: int, init: str | None) -> tuple[nn.Module, tuple, tuple]:
    """(model, mean, std): timm's convnext_atto from the timm-layout file `init` (its stem stride read off the file),
    or torchvision's ResNet-18 (from a ResNet-18 state dict `init`, its fc dropped); a fresh head of `classes`."""
    if arch == "timm":
        import timm

        if init is None:
            raise ValueError("the timm row starts from a timm-layout file")
        patch = torch.load(init, map_location="cpu", weights_only=True)["stem.0.weight"].shape[-1]
        model = timm.create_model("convnext_atto", pretrained=True, pretrained_cfg_overlay=dict(file=init),
                                  num_classes=classes, patch_size=patch)  # fmt: skip
        data = timm.data.resolve_data_config({}, model=model)
        return model, tuple(data["mean"]), tuple(data["std"])
    if arch != "resnet18":
        raise ValueError(f"unknown peer {arch!r} ({', '.join(PEERS)})")
    import torchvision

    model = torchvision.models.resnet18(num_classes=classes)
    if init is not None:
        state = {k: v for k, v in torch.load(init, map_location="cpu", weights_only=True).items() if k[:3] != "fc."}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) != {"fc.weight", "fc.bias"} or unexpected:
            raise ValueError(f"{init}: not a ResNet-18 state dict (missing {missing}, unexpected {unexpected})")
    return model, IMAGENET_MEAN, IMAGENET_STD


def plain_loop(spec: dict) -> dict:
    """Train `spec["arch"]` (a peer_model) on `spec["data"]`/train for `spec["minutes"]` of training steps in the
    module doc's plain loop, score it on the held-out split; saves the state dict to `spec["save"]` if given.
    Returns {"top1", "steps", "epochs", "train_s", "img_per_s", "img_size"}."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    data, size, lr = Path(spec["data"]), spec["img_size"], spec["lr"]
    train, val = ImageFolder(str(split_dir(data, "train"))), ImageFolder(str(split_dir(data, "val")))
    model, mean, std = peer_model(spec["arch"], len(train.classes), spec.get("init"))
    norm = T.Normalize(mean, std)
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), norm])
    images = [(train.loader(p), y) for p, y in train.samples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    budget, batch = spec["minutes"] * 60, min(64, len(images))
    spent, steps = 0.0, 0  # seconds of training steps: the budget's clock
    model.train()
    while spent < budget:
        order = torch.randperm(len(images)).tolist()
        for i in range(0, len(order) - batch + 1, batch):
            if spent >= budget:
                break
            start, frac = time.perf_counter(), spent / budget
            for g in opt.param_groups:  # 5% linear warmup, then a cosine to zero at the budget
                g["lr"] = lr * (frac / 0.05 if frac < 0.05 else 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))
            x = torch.stack([train_tf(images[j][0]) for j in order[i : i + batch]])  # (B, 3, S, S)
            y = torch.tensor([images[j][1] for j in order[i : i + batch]])
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{spec['arch']}: loss {loss.item()} at step {steps}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            spent += time.perf_counter() - start
            steps += 1
    top1 = sibling("folder_vs_resnet18").held_out_top1(model, val, test_tf)
    if spec.get("save"):
        torch.save(model.state_dict(), spec["save"])
    return {
        "top1": top1,
        "steps": steps,
        "epochs": round(steps * batch / len(images), 2),
        "train_s": round(spent, 1),
        "img_per_s": round(steps * batch / max(spent, 1e-9), 1),
        "img_size": size,
    }


def run_peer(spec: dict, folder: Path) -> dict:
    """`plain_loop(spec)` in a process of its own (this script with --peer); its result is kept in
    `folder`/result.json, which a later call returns without training again."""
    result = folder / "result.json"
    if not result.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
        env = os.environ | {"OMP_NUM_THREADS": str(spec["threads"])}
        print(f"$ {spec['arch']} plain loop on {spec['data']} ({spec['minutes']:g} min) -> {folder}", flush=True)
        subprocess.run([sys.executable, __file__, "--peer", str(folder / "spec.json")], check=True, env=env)
    return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------ our commands


def convnext(*args: str, threads: int) -> None:
    """`python -m convnext ARGS --threads T` in its own process, its output passed through; raises if it fails."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    print("$ convnext " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "convnext", *args, "--threads", str(threads)], check=True, env=env)


def finished(run: Path) -> bool:
    return (run / "results.json").is_file()


def convert(src: Path, dst: Path, layout: str) -> Path:
    """`convnext convert SRC DST --to LAYOUT`, written under a temporary name first; kept once written."""
    if not dst.exists():
        tmp = dst.with_name(f"partial-{dst.name}")
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)
        if convnext_main(["convert", str(src), str(tmp), "--to", layout]) != 0:
            raise RuntimeError(f"convnext convert {src} {tmp} --to {layout} failed")
        tmp.rename(dst)
    return dst


def needed_sources(rows: list[str], layouts: list[str]) -> set[str]:
    """The sources `rows` start from (auto-ft through each of `layouts`)."""
    need = {layout for layout in layouts if "auto-ft" in rows}
    need |= {"timm-pth" for row in ("preset-finetune", "timm") if row in rows}
    need |= {"fcmae"} if "auto-ft-fcmae" in rows else set()
    return need | ({"resnet18"} if "resnet18" in rows else set())


def make_sources(
    cifar: Path, work: Path, minutes: float, threads: int, need: set[str], fcmae_min: tuple[float, ...] = ()
) -> dict[str, Path]:
    """The source weights on CIFAR-10 at 64 px (module doc) that `need` names (of LAYOUTS, "fcmae", "resnet18"),
    each made once under `work`/source-<minutes>m, and FCMAE sources pre-trained for each of `fcmae_min` minutes
    ("fcmae@<m>m"). Returns name -> path, with "run" whenever a layout is needed."""
    where = work / f"source-{minutes:g}m"
    common = ["--data", str(cifar), "--img-size", "64", "--model", "convnext_atto", "--budget-min", f"{minutes:g}",
              "--seed", "0", "--overwrite"]  # fmt: skip
    out: dict[str, Path] = {}
    if need & set(LAYOUTS):
        out["run"] = where / "supervised"
        if not finished(out["run"]):
            convnext("train", "--output", str(out["run"]), *common, threads=threads)
    if "fcmae" in need:
        out["fcmae"] = where / "fcmae"
        if not finished(out["fcmae"]):
            convnext("pretrain", "--output", str(out["fcmae"]), *common, threads=threads)
    for m in fcmae_min:  # the curve: FCMAE sources pre-trained for other minutes
        out[f"fcmae@{m:g}m"] = work / f"source-{m:g}m" / "fcmae"
        if not finished(out[f"fcmae@{m:g}m"]):
            longer = [*common[: common.index("--budget-min")], "--budget-min", f"{m:g}", "--seed", "0", "--overwrite"]
            convnext("pretrain", "--output", str(out[f"fcmae@{m:g}m"]), *longer, threads=threads)
    for layout, file in (("timm-pth", "timm.pth"), ("timm-safetensors", "timm.safetensors")):
        if layout in need:
            out[layout] = convert(out["run"] / "best.pt", where / file, "timm")
    if "hf" in need:
        out["hf"] = convert(out["run"], where / "hf", "hf")
    if "resnet18" in need:
        resnet = where / "resnet18"
        spec = {"arch": "resnet18", "data": str(cifar), "img_size": 64, "minutes": minutes, "lr": SOURCE_LR,
                "threads": threads, "seed": 0, "init": None, "save": str(resnet / "resnet18.pt")}  # fmt: skip
        run_peer(spec, resnet)
        out["resnet18"] = resnet / "resnet18.pt"
    return out


def source_summary(sources: dict[str, Path]) -> dict:
    """What each source scored on CIFAR-10's held-out images (the FCMAE run: its val loss), and the supervised
    run's recipe."""
    out: dict = {}
    if "run" in sources:
        out["run_top1"] = json.loads((sources["run"] / "results.json").read_text())["top1"]
        out["run_recipe"] = json.loads((sources["run"] / "config.json").read_text()).get("recipe") or []
    if "fcmae" in sources:
        out["fcmae_loss"] = json.loads((sources["fcmae"] / "results.json").read_text())["loss"]
    for name in (n for n in sources if n.startswith("fcmae@")):
        out[f"{name}_loss"] = json.loads((sources[name] / "results.json").read_text())["loss"]
    if "resnet18" in sources:
        out["resnet18_top1"] = json.loads((sources["resnet18"].parent / "result.json").read_text())["top1"]
    return out


def source_args(row: str, layout: str, sources: dict[str, Path]) -> list[str]:
    """The `convnext train` flags that say what `row` (through `layout`, for auto-ft) starts from."""
    if row == "auto-ft" and layout in ("timm-pth", "timm-safetensors"):
        return ["--model", "convnext_atto", "--model.checkpoint", str(sources[layout])]
    if row == "auto-ft":
        return ["--model", str(sources[layout])]
    if row == "auto-ft-fcmae":
        return ["--model", str(sources[layout if layout.startswith("fcmae@") else "fcmae"])]
    if row == "scratch":
        return ["--model", "convnext_atto"]
    if row == "preset-finetune":
        return ["--preset", "finetune", "--model", "convnext_atto", "--model.checkpoint", str(sources["timm-pth"])]
    raise ValueError(f"{row}: not one of our rows")


def run_ours(target: Path, run: Path, start: list[str], minutes: float, seed: int, threads: int) -> dict:
    """`convnext train` on `target` from `start` (once), scored once by `convnext eval` on its final weights
    (last.pt: no checkpoint chosen on the held-out images); the row is kept in `run`/row.json."""
    row = run / "row.json"
    if row.is_file():
        return json.loads(row.read_text())
    if not finished(run):
        convnext("train", "--data", str(target), "--output", str(run), *start, "--budget-min", f"{minutes:g}",
                 "--seed", str(seed), "--overwrite", threads=threads)  # fmt: skip
    printed, command = io.StringIO(), ["eval", "--checkpoint", str(run / "last.pt"), "--data", str(target), "--json"]
    with contextlib.redirect_stdout(printed):
        if convnext_main([*command, "-q"]) != 0:
            raise RuntimeError(f"convnext {' '.join(command)} failed")
    scores = json.loads(printed.getvalue().strip().splitlines()[-1])
    cfg, results = json.loads((run / "config.json").read_text()), json.loads((run / "results.json").read_text())
    out = {
        "top1": round(scores["top1"], 2),
        "ema_top1": round(scores["ema"]["top1"], 2) if "ema" in scores else None,
        "steps": results.get("steps"),
        "epochs": results.get("epochs"),
        "train_s": round(results.get("train_s") or 0.0, 1),
        "img_per_s": round(results.get("img_per_s") or 0.0, 1),
        "img_size": cfg["data"]["img_size"],
        "recipe": cfg.get("recipe") or [],
        "command": "convnext train --data T " + " ".join(start),
    }
    row.write_text(json.dumps(out, indent=1) + "\n")
    return out


# ------------------------------------------------------------------------------------------------ report


def row_names(rows: list[str], layouts: list[str], fcmae_min: tuple[float, ...] = ()) -> list[str]:
    """The table's rows: auto-ft once per layout (`auto-ft` for the run folder, `auto-ft:<layout>` else), and
    auto-ft-fcmae once more per point of the FCMAE curve (`auto-ft-fcmae:fcmae@<m>m`)."""
    names = []
    for row in rows:
        if row == "auto-ft":
            names += [row if layout == "run" else f"{row}:{layout}" for layout in layouts]
        elif row == "auto-ft-fcmae":
            names += [row] + [f"{row}:fcmae@{m:g}m" for m in fcmae_min]
        else:
            names.append(row)
    return names


def cell(values: list[float]) -> str:
    """Top-1 of one seed, or the mean and the spread (max - min) of several."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ({max(values) - min(values):.2f})"


def markdown(report: dict) -> str:
    a, info = report["args"], report["machine"]
    names = list(dict.fromkeys(r["row"] for r in report["rows"]))
    top1 = {(r["target"], r["row"]): [] for r in report["rows"]}
    sizes: dict[str, int] = {}
    for r in report["rows"]:
        top1[r["target"], r["row"]].append(r["top1"])
        sizes.setdefault(r["target"], r["img_size"])
    src = report["sources"]
    made = []
    if "run_top1" in src:
        made.append(f"supervised convnext_atto (`convnext train`) top-1 {src['run_top1']:.2f}% on the test images")
    if "fcmae_loss" in src:
        made.append(f"FCMAE (`convnext pretrain`) val loss {src['fcmae_loss']:.4f}")
    if "resnet18_top1" in src:
        made.append(f"ResNet-18 (plain loop) top-1 {src['resnet18_top1']:.2f}%")
    seeds = a["seeds"]
    smoke = " - a smoke run (--quick): these figures measure nothing" if a["quick"] else ""
    lines = [
        f"# Fine-tuning at equal task budget ({a['budget_min']:g} min a row){smoke}",
        "",
        f"{info['cpu']}, {a['threads']} threads, torch {info['torch']}, {report['date']}; `{report['command']}`.",
        f"Sources on CIFAR-10 at 64 px, {a['source_min']:g} min each: {', '.join(made)}. Peers' fine-tuning lr "
        f"{a['peer_lr']:g} (AdamW, batch 64).",
        f"Top-1 (%) of the final weights on each target's held-out images; seeds {seeds}"
        + ("; mean (spread max-min)." if len(seeds.split(",")) > 1 else "."),
        "",
        "| row | " + " | ".join(f"{t} (auto-ft at {sizes[t]} px)" for t in sizes) + " |",
        "|---|" + "---|" * len(sizes),
        *(f"| {n} | " + " | ".join(cell(top1.get((t, n), [])) for t in sizes) + " |" for n in names),
    ]
    curve = [(a["source_min"], "auto-ft-fcmae")] + [(m, f"auto-ft-fcmae:fcmae@{m:g}m") for m in a.get("fcmae_min", [])]
    curve = sorted((m, n) for m, n in curve if n in names)
    if len(curve) > 1 and "scratch" in names:
        lines += ["", "FCMAE: minutes of pre-training against the gain in top-1 over the scratch row (points):", "",
                  "| pre-training min | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]  # fmt: skip
        for m, n in curve:
            gains = [statistics.mean(top1[t, n]) - statistics.mean(top1[t, "scratch"]) if top1.get((t, n)) and
                     top1.get((t, "scratch")) else None for t in sizes]  # fmt: skip
            lines.append(f"| {m:g} | " + " | ".join("-" if g is None else f"{g:+.2f}" for g in gains) + " |")
    return "\n".join(lines) + "\n"


def results_stem(now: datetime.datetime) -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in platform.node()) or "host"
    return f"finetune-{host}-{now:%Y-%m-%d}"


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-min", type=float, help="training minutes of each row, the task budget (default 3)")
    p.add_argument("--source-min", type=float, help="training minutes of each source on CIFAR-10 (default 10)")
    p.add_argument("--targets", help=f"comma list of {', '.join(TARGETS)} (default all)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--layouts", default="run", help=f"auto-ft's sources: run, all, or a comma list of {LAYOUTS}")
    p.add_argument("--seeds", default="0", help="comma list; each row is run once per seed")
    p.add_argument("--fcmae-min", default="", help="comma list of further FCMAE pre-training minutes: the curve of "
                   "pre-training minutes against the gain over scratch (auto-ft-fcmae once per point)")  # fmt: skip
    p.add_argument("--peer-lr", type=float, default=1e-4, help="the timm and ResNet-18 rows' AdamW lr")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shared", type=Path, default=SHARED, help="folder of cifar10-jpg.tar, camvid.tar, pennfudan.tar")
    p.add_argument("--work", type=Path, default=None, help="data, run folders and rows (default runs/finetune)")
    p.add_argument("--results", type=Path, default=None, help="write the .md and .json here (default "
                   "benchmarks/results; --quick: the work folder)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="smoke run: 0.05 min budgets, a slice of the data, one "
                   "target (camvid64 unless --targets is given)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of the table")
    p.add_argument("--peer", type=Path, help="(internal) run the plain loop of this spec.json and write result.json")
    args = p.parse_args(argv)
    if args.peer is not None:
        result = plain_loop(json.loads(args.peer.read_text()))
        args.peer.with_name("result.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0

    quick = args.quick
    args.budget_min = args.budget_min or (0.05 if quick else 3.0)
    args.source_min = args.source_min or (0.05 if quick else 10.0)
    args.targets = args.targets or ("camvid64" if quick else ",".join(TARGETS))
    work = args.work or ROOT / "runs" / ("finetune-quick" if args.quick else "finetune")
    results_dir = args.results or (work if args.quick else ROOT / "benchmarks" / "results")
    targets, rows = args.targets.split(","), args.rows.split(",")
    rows = [r for r in ROWS if r in rows] + [r for r in rows if r not in ROWS]  # auto-ft first: the peers take its size
    layouts = list(LAYOUTS) if args.layouts == "all" else args.layouts.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    fcmae_min = tuple(float(m) for m in args.fcmae_min.split(",") if m)
    if fcmae_min and "auto-ft-fcmae" not in rows:
        p.error("--fcmae-min: the curve's rows are auto-ft-fcmae's; include it in --rows")
    for name, got, known in (("--targets", targets, TARGETS), ("--rows", rows, ROWS), ("--layouts", layouts, LAYOUTS)):
        if unknown := [g for g in got if g not in known]:
            p.error(f"{name}: unknown {', '.join(unknown)} ({', '.join(known)})")
    if "auto-ft" not in rows and any(r in PEERS for r in rows):
        p.error("--rows: the timm and resnet18 rows train at the size auto-ft chose; include auto-ft")
    torch.set_num_threads(args.threads)
    now = datetime.datetime.now()

    cifar = unpack(args.shared / "cifar10-jpg.tar", work / "data" / ("cifar10-slice" if args.quick else "cifar10"),
                   per_folder=16 if args.quick else None) / "cifar10-images"  # fmt: skip
    sources = make_sources(cifar, work, args.source_min, args.threads, needed_sources(rows, layouts), fcmae_min)
    records = []
    for target_name in targets:
        target = build_target(target_name, work, args.shared, cifar, args.quick)
        for seed in seeds:
            here = work / f"{target_name}-{args.budget_min:g}m" / f"seed{seed}"
            size = None
            for name in row_names(rows, layouts, fcmae_min):
                row, _, layout = name.partition(":")
                if row in PEERS:
                    init = str(sources["timm-pth"] if row == "timm" else sources["resnet18"])
                    spec = {"arch": row, "data": str(target), "img_size": size, "minutes": args.budget_min,
                            "lr": args.peer_lr, "threads": args.threads, "seed": seed, "init": init}  # fmt: skip
                    got = run_peer(spec, here / row)
                else:
                    start = source_args(row, layout or "run", sources)
                    got = run_ours(target, here / name.replace(":", "-"), start, args.budget_min, seed, args.threads)
                    size = got["img_size"] if name == "auto-ft" else size
                records.append({"target": target_name, "row": name, "seed": seed} | got)

    report = {
        "benchmark": "finetune",
        "date": f"{now:%Y-%m-%d %H:%M}",
        "command": "python benchmarks/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": system_info() | {"threads": args.threads},
        "args": {"budget_min": args.budget_min, "source_min": args.source_min, "seeds": args.seeds,
                 "peer_lr": args.peer_lr, "threads": args.threads, "quick": args.quick, "layouts": layouts,
                 "fcmae_min": list(fcmae_min)},
        "sources": source_summary(sources),
        "rows": records,
    }  # fmt: skip
    table = markdown(report)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / results_stem(now)
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json else table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
