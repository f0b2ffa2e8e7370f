"""A Hugging Face Hub cache folder filled offline, in the Hub's own layout:

    models--ORG--NAME/refs/main                     the commit hash of `main`
    models--ORG--NAME/snapshots/COMMIT/PATH         a relative symlink to ../../blobs/SHA256 per file
    models--ORG--NAME/blobs/SHA256                  the file's bytes

`huggingface_hub.snapshot_download(..., local_files_only=True)` reads it as it reads a real download.
"""
import hashlib
import os
from pathlib import Path


def add_repo(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40, ref: str | None = "main") -> Path:
    """Put every file below `folder` into `cache` as snapshot `commit` of `repo_id`; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
