"""Hugging Face Hub repo ids as weight sources, and the choice of weight files in a folder.

`hub_folder("warp-ai/wuerstchen-prior", ...)` returns the repo's snapshot folder in the Hub cache
(`~/.cache/huggingface/hub`, or `cache_dir=` / `HF_HUB_CACHE`), downloading what is missing with
`huggingface_hub.snapshot_download`. Online, only the files a pipeline reads are fetched (configs,
tokenizer files and, per model folder, one set of weights: the `variant=` files when there are
some, safetensors unless `use_safetensors=False`). Offline (`local_files_only=True`, or
`HF_HUB_OFFLINE=1`) the cached snapshot is used as it is; a repo missing from the cache is an error
that names it and says how to download it.

`weights_view(folder, variant, use_safetensors)` is how the chosen files reach the loaders: a
temporary folder of links holding the folder's files, with the chosen weights under the plain names
(`diffusion_pytorch_model.fp16.safetensors` as `diffusion_pytorch_model.safetensors`) and the
others left out, so every loader reads exactly the files asked for.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

__all__ = ["is_repo_id", "hub_folder", "select_files", "weights_view"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[\w]$")
# diffusers / transformers weight files: base[.variant][-00001-of-00002].ext and their shard indices
_WEIGHT = re.compile(r"^(?P<base>diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
                     r"(?P<shard>-\d+-of-\d+)?\.(?P<ext>safetensors|bin)$")
_INDEX = re.compile(r"^(?P<base>diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<v1>[A-Za-z0-9_]+))?"
                    r"\.(?P<ext>safetensors|bin)\.index(?:\.(?P<v2>[A-Za-z0-9_]+))?\.json$")
# weights in formats no loader here reads (flax, onnx, ...): never downloaded
_OTHER_WEIGHTS = (".msgpack", ".onnx", ".onnx_data", ".h5", ".pb", ".tflite", ".ckpt", ".pt", ".pth", ".pkl")


def is_repo_id(src) -> bool:
    """`org/name` that is not an existing local path."""
    return isinstance(src, str) and bool(_REPO_ID.match(src)) and not Path(src).exists()


def _weight_info(name: str):
    m = _WEIGHT.match(name)
    if m:
        return m["base"], m["variant"], m["ext"]
    m = _INDEX.match(name)
    if m:
        return m["base"], m["v1"] or m["v2"], m["ext"]
    return None


def select_files(files: Iterable[str], variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The files of a repo (posix paths) a pipeline needs: everything that is not a weight file, and for
    each folder one set of weights: `variant`'s if the folder has them (else the plain ones), in
    safetensors unless use_safetensors=False (True: safetensors only; None: .bin where no safetensors)."""
    files = list(files)
    keep = [f for f in files if _weight_info(PurePosixPath(f).name) is None
            and not f.lower().endswith(_OTHER_WEIGHTS)]
    folders: dict[tuple, list[tuple]] = {}
    for f in files:
        info = _weight_info(PurePosixPath(f).name)
        if info is not None:
            folders.setdefault((str(PurePosixPath(f).parent), info[0]), []).append((f, info[1], info[2]))
    exts = ["safetensors"] if use_safetensors else ["bin"] if use_safetensors is False else ["safetensors", "bin"]
    for entries in folders.values():
        for ext in exts:
            of_ext = [e for e in entries if e[2] == ext]
            chosen = [e for e in of_ext if e[1] == variant] if variant else []
            chosen = chosen or [e for e in of_ext if e[1] is None]
            if chosen:
                keep += [e[0] for e in chosen]
                break
    return sorted(keep)


def _offline_requested(local_files_only: bool | None) -> bool:
    if local_files_only:
        return True
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on") or \
        bool(constants.HF_HUB_OFFLINE)


def hub_folder(repo_id: str, *, revision: str | None = None, cache_dir=None, local_files_only: bool | None = None,
               variant: str | None = None, use_safetensors: bool | None = None, token=None) -> Path:
    """The snapshot folder of a Hub model repo (downloading what is missing unless offline)."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # a dependency of the package; reached only in a broken environment
        raise ImportError(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub "
                          "(pip install huggingface_hub), or pass a local folder") from None
    from .. import __version__

    offline = _offline_requested(local_files_only)
    where = str(cache_dir or constants.HF_HUB_CACHE)
    at = f" at revision {revision!r}" if revision else ""
    how = (f"download it where there is network with `hf download {repo_id}"
           + (f" --revision {revision}" if revision else "") + (f" --cache-dir {where}" if cache_dir else "")
           + "` (or huggingface-cli download), or pass the path of a local copy")
    common = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir, token=token,
                  library_name="wuerstchen_fast", library_version=__version__)
    try:
        if offline:
            return Path(huggingface_hub.snapshot_download(local_files_only=True, **common))
        try:
            files = huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision, token=token)
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError):
            raise
        except Exception:  # no network: the cache may still have it
            return Path(huggingface_hub.snapshot_download(local_files_only=True, **common))
        return Path(huggingface_hub.snapshot_download(allow_patterns=select_files(files, variant, use_safetensors),
                                                      **common))
    except LocalEntryNotFoundError:
        why = "downloading is off (local_files_only=True or HF_HUB_OFFLINE=1)" if offline else "the Hub cannot be reached"
        raise FileNotFoundError(f"the Hub repo {repo_id!r}{at} is not in the Hugging Face cache ({where}) and {why}: "
                                f"{how}") from None
    except GatedRepoError:
        raise FileNotFoundError(f"the Hub repo {repo_id!r} is gated: accept its terms on huggingface.co, then log in "
                                "(`hf auth login`) or pass token=") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hub repo {repo_id!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"there is no Hub repo {repo_id!r} (or it is private: log in with `hf auth login` "
                                "or pass token=); check the name, or pass a local folder") from None


@contextlib.contextmanager
def weights_view(folder: Path, variant: str | None = None, use_safetensors: bool | None = None) -> Iterator[Path]:
    """`folder` as the loaders should see it for this variant / format (itself when nothing is asked)."""
    folder = Path(folder)
    if (variant is None and use_safetensors is None) or not folder.is_dir():
        yield folder
        return
    tmp = Path(tempfile.mkdtemp(prefix="wuerstchen_fast-view-"))
    try:
        chosen = set(select_files([p.name for p in folder.iterdir() if p.is_file()], variant, use_safetensors))
        for p in folder.iterdir():
            if p.is_dir():
                (tmp / p.name).symlink_to(p.resolve(), target_is_directory=True)
            elif p.name in chosen:
                info = _weight_info(p.name)
                name = p.name
                if info is not None and info[1] is not None:  # the variant under the plain name
                    name = name.replace(f".{info[1]}.", ".", 1)
                (tmp / name).symlink_to(p.resolve())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
