"""`vitlab` command line: `vitlab cache ls` / `vitlab cache verify [KEY...]` /
`vitlab cache rm KEY... | --stage S | --all`.

The stage cache lives in `$VITLAB_CACHE` or `./.cache/vitlab` (the `paths.cache_dir` default);
`--cache-dir` points elsewhere. Only vitlab's own entries are listed, checked or removed:
`<stage>/<key>/` folders whose manifest carries `"written_by": "vitlab"` (or, written before
that marker, matches the stage manifest schema exactly); any other folder with a manifest.json
is named as skipped and never touched, and `rm` deletes only the files a stage writes, keeping
an entry folder (and what a user put in it) that is not empty then.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from vitlab.data.shards import (
    MANIFEST,
    SHARD_NAME_RE,
    WRITTEN_BY,
    check_shard,
    is_stage_file,
    read_manifest,
)

STAGES = ("prepare", "embed", "tiles")  # the stage folders of a cache dir
KEY_RE = re.compile(r"^[0-9a-f]{16}$")  # a cache key (`vitlab.cache.content_key`)


@dataclass
class CacheEntry:
    stage: str
    key: str
    path: Path
    complete: bool
    shards: int
    rows: int
    bytes: int
    params: dict
    state: str = "complete"  # complete | partial | corrupt (manifest unreadable)
    legacy: bool = False  # written before manifests carried `written_by` (recognised by schema)


@dataclass
class Skipped:
    """A folder with a manifest.json that is not a vitlab cache entry: never listed or touched."""

    path: Path
    reason: str


def default_cache_dir() -> Path:
    """Where train.py caches (configs/paths: VITLAB_CACHE, else <VITLAB_ROOT or cwd>/.cache)."""
    root = Path(os.environ.get("VITLAB_ROOT") or Path.cwd())
    return Path(os.environ.get("VITLAB_CACHE") or root / ".cache" / "vitlab")


def foreign_reason(folder: Path, manifest: dict | None) -> str | None:
    """Why `folder` (holding `manifest`, None when unreadable) is not a stage entry vitlab
    wrote, or None when it is one: `<stage>/<key>/` with a manifest of that key that carries
    vitlab's marker. A manifest without the marker (written before it existed) must match the
    stage manifest schema exactly; one that is not JSON (damaged on disk) counts only beside
    shards, in a folder holding nothing but files a stage writes."""
    stage, key = folder.parent.name, folder.name
    if folder.is_symlink():
        return "a symbolic link (vitlab does not make those)"
    if stage not in STAGES:
        return f"not in a stage folder ({' | '.join(STAGES)})"
    if not KEY_RE.match(key):
        return "its name is not a cache key (16 hex digits)"
    if manifest is None:  # a vitlab manifest damaged on disk: only beside vitlab's shards
        names = [p.name for p in folder.iterdir()]
        others = [n for n in names if not is_stage_file(n)]
        if others or not any(SHARD_NAME_RE.match(n) for n in names):
            return f"unreadable {MANIFEST}, and not beside shards alone ({others[:3]})"
        return None
    if manifest.get("key") != key:
        return f"its manifest's key is {manifest.get('key')!r}, not the folder name"
    marker = manifest.get("written_by")
    if marker == WRITTEN_BY:
        return None
    if marker is not None:
        return f"its manifest was written by {marker!r}"
    if not (
        isinstance(manifest.get("params"), dict) and isinstance(manifest.get("complete"), bool)
    ):
        return "no vitlab marker, and not a stage manifest (params, complete)"
    if not all(SHARD_NAME_RE.match(name) for name in manifest["shards"]):
        return "no vitlab marker, and shards not named part-NNNNN.parquet"
    return None


def scan_cache(cache_dir: Path) -> tuple[list[CacheEntry], list[Skipped]]:
    """The stage entries in `cache_dir`, and the other `*/*/manifest.json` folders skipped."""
    entries, skipped = [], []
    for manifest_path in sorted(cache_dir.glob(f"*/*/{MANIFEST}")):
        folder = manifest_path.parent
        try:
            manifest: dict | None = read_manifest(manifest_path)
        except (ValueError, OSError) as err:  # a run of the stage recomputes it; `rm` removes it
            manifest = None
            if _is_json(manifest_path):  # vitlab writes atomically: well-formed is someone else's
                skipped.append(Skipped(folder, f"not a stage manifest ({err})"))
                continue
        reason = foreign_reason(folder, manifest)
        if reason is not None:
            skipped.append(Skipped(folder, reason))
            continue
        manifest = manifest or {}
        state = "corrupt" if not manifest else "complete" if manifest.get("complete") else "partial"
        shards = manifest.get("shards", {})
        size = sum(p.stat().st_size for p in _stage_files(folder))
        entries.append(
            CacheEntry(
                folder.parent.name,
                folder.name,
                folder,
                state == "complete",
                len(shards),
                sum(s.get("rows", 0) for s in shards.values()),
                size,
                manifest.get("params", {}),
                state,
                legacy=bool(manifest) and "written_by" not in manifest,
            )
        )
    return entries, skipped


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except (ValueError, OSError):
        return False
    return True


def list_cache(cache_dir: Path) -> list[CacheEntry]:
    return scan_cache(cache_dir)[0]


def _stage_files(folder: Path) -> list[Path]:
    """The files a stage wrote in its folder (links and subfolders are never a stage's)."""
    return [
        p for p in folder.iterdir() if is_stage_file(p.name) and p.is_file() and not p.is_symlink()
    ]


def remove_entry(folder: Path) -> list[str]:
    """Delete the files a stage wrote in `folder`, the manifest last (an interrupted `rm`
    leaves an entry `rm` still recognises), then the folder when that emptied it. Returns the
    names left: files a user put there, kept with their folder."""
    for path in sorted(_stage_files(folder), key=lambda p: p.name == MANIFEST):
        path.unlink(missing_ok=True)
    left = sorted(p.name for p in folder.iterdir())
    if not left:
        try:
            folder.rmdir()
        except OSError:  # something was written there meanwhile: keep it
            left = sorted(p.name for p in folder.iterdir())
    return left


def _report_skipped(skipped: list[Skipped]) -> None:
    """Folders that look like entries but are not vitlab's: named on stderr, never touched."""
    if not skipped:
        return
    print(
        f"skipped {len(skipped)} folder(s) with a {MANIFEST}: not a vitlab cache entry",
        file=sys.stderr,
    )
    for s in skipped:
        print(f"    {s.path}: {s.reason}", file=sys.stderr)


def _describe(params: dict) -> str:
    backbone = params.get("backbone", {})
    if backbone:
        name = backbone.get("name") or backbone.get("model_id")
        source = params.get("prepared")
        if source is None and "quadrats" in params:  # test tiles
            source = f"{params['quadrats']} quadrats in {params.get('root')}, {params.get('boxes')}"
        return f"{name} / {params.get('features', {}).get('name', '?')} <- {source}"
    return ", ".join(f"{k}={v}" for k, v in params.items())


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `vitlab cache ls | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitlab")
    sub = parser.add_subparsers(dest="command", required=True)
    cache = sub.add_parser("cache", help="list or remove cached stage outputs")
    cache_sub = cache.add_subparsers(dest="action", required=True)
    for action in ("ls", "verify", "rm"):
        p = cache_sub.add_parser(action)
        p.add_argument("--cache-dir", type=Path, default=None)
        p.add_argument("--stage", choices=["prepare", "embed", "tiles"], default=None)
        if action in ("rm", "verify"):
            p.add_argument("keys", nargs="*", help="cache keys (or unique prefixes)")
        if action == "rm":
            p.add_argument("--all", action="store_true", help="every entry (of --stage)")
        elif action == "ls":
            p.add_argument("--json", action="store_true")
    groupvit = sub.add_parser("groupvit", help="convert or inspect GroupViT checkpoints")
    gv_sub = groupvit.add_subparsers(dest="action", required=True)
    export = gv_sub.add_parser("export", help="write a checkpoint in another format")
    export.add_argument("source", help="vitlab .pt/.ckpt, NVlabs .pth, transformers dir or hub id")
    export.add_argument("out", type=Path, help="output directory (transformers) or file")
    export.add_argument(
        "--to", choices=["transformers", "nvlabs", "vitlab"], default="transformers"
    )
    export.add_argument(
        "--kind", choices=["auto", "vitlab", "nvlabs", "transformers"], default="auto"
    )
    export.add_argument(
        "--no-processor",
        action="store_true",
        help="--to transformers: weights and config only, without the tokenizer and image "
        "processor files (written by default so the folder loads as a full HF model)",
    )
    info = gv_sub.add_parser("info", help="architecture and parameter count of a checkpoint")
    info.add_argument("source")
    info.add_argument(
        "--kind", choices=["auto", "vitlab", "nvlabs", "transformers"], default="auto"
    )
    for command in (export, info):  # NVlabs state dicts do not show head counts
        command.add_argument("--num-heads", type=int, default=None, help="image encoder heads")
        command.add_argument("--text-heads", type=int, default=None, help="text encoder heads")
        command.add_argument(
            "--trust-checkpoint",
            action="store_true",
            help="fully unpickle a file holding objects the safe loader refuses (runs its code)",
        )
    args = parser.parse_args(argv)
    if args.command == "groupvit":
        return _groupvit(args)
    return _cache(parser, args)


def _groupvit(args: argparse.Namespace) -> int:
    """`vitlab groupvit export|info`: strict loading, so a mismatched file is an error."""
    import torch

    from vitlab.models.groupvit.checkpoints import (
        CheckpointError,
        export_transformers,
        load_groupvit,
        nvlabs_payload,
        save_groupvit,
    )

    try:
        heads = {"num_heads": args.num_heads, "text_heads": args.text_heads}
        overrides = {k: v for k, v in heads.items() if v}
        model = load_groupvit(
            args.source, args.kind, overrides, args.trust_checkpoint, "--trust-checkpoint"
        )
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.action == "info":
        n_params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"spec": model.spec.to_dict(), "parameters": n_params}, indent=1))
        return 0
    if args.to == "transformers":
        try:
            out = export_transformers(model, args.out, processor=not args.no_processor)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif args.to == "nvlabs":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        torch.save(nvlabs_payload(model), tmp)
        tmp.replace(args.out)
        out = args.out
    else:
        out = save_groupvit(model, args.out)
    print(f"wrote {args.to} checkpoint {out}")
    return 0


def _cache(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or default_cache_dir()
    entries, skipped = scan_cache(cache_dir)
    entries = [e for e in entries if args.stage in (None, e.stage)]
    try:
        return _cache_action(parser, args, cache_dir, entries)
    finally:  # after the listing: what was not touched, and why
        _report_skipped([s for s in skipped if args.stage in (None, s.path.parent.name)])


def _cache_action(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    cache_dir: Path,
    entries: list[CacheEntry],
) -> int:
    if args.action == "ls":
        if args.json:
            print(json.dumps([{**e.__dict__, "path": str(e.path)} for e in entries], default=str))
            return 0
        print(f"{len(entries)} cached stage output(s) in {cache_dir}")
        for e in entries:
            state = e.state if e.state == "complete" else e.state.upper()
            print(
                f"{e.stage:8s} {e.key}  {state:8s} {e.shards:4d} shards {e.rows:9d} rows "
                f"{e.bytes / 2**20:9.1f} MiB  {_describe(e.params)}"
            )
        return 0
    if args.action == "verify":
        return _verify(entries if not args.keys else _select(entries, args.keys))
    if not args.keys and not args.all:
        parser.error("cache rm needs KEY... or --all")
    chosen = entries if args.all else _select(entries, args.keys)
    if chosen is None:
        return 2
    for e in chosen:
        left = remove_entry(e.path)
        print(f"removed {e.stage} {e.key} ({e.bytes / 2**20:.1f} MiB)")
        if left:
            print(f"    kept {e.path}: it holds what vitlab did not write: {', '.join(left)}")
    return 0


def _select(entries: list[CacheEntry], keys: list[str]) -> list[CacheEntry] | None:
    """The entries named by unique key prefixes; None (after an error message) otherwise."""
    chosen = []
    for key in keys:
        matches = [e for e in entries if e.key.startswith(key)]
        if len(matches) != 1:
            print(f"error: key {key!r} matches {len(matches)} entries", file=sys.stderr)
            return None
        chosen += matches
    return chosen


def _verify(entries: list[CacheEntry] | None) -> int:
    """Check every recorded shard's size and SHA-256 (read-only: the next run of the stage
    drops and recomputes bad shards). Exit 1 when something is wrong."""
    if entries is None:
        return 2
    bad = 0
    for e in entries:
        if e.state == "corrupt":
            print(f"{e.stage:8s} {e.key}  CORRUPT manifest")
            bad += 1
            continue
        shards = read_manifest(e.path / MANIFEST)["shards"]
        problems = [
            f"{name} {problem}"
            for name, entry in sorted(shards.items())
            if (problem := check_shard(e.path / name, entry)) is not None
        ]
        print(f"{e.stage:8s} {e.key}  {'ok' if not problems else 'BAD'} ({len(shards)} shards)")
        for line in problems:
            print(f"    {line}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
