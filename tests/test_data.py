"""Training data: the synthetic shapes set, image folders, webdataset shards, and the resumable loader."""
from __future__ import annotations

import io
import tarfile

import pytest
import torch
from PIL import Image

from wuerstchen_fast.data import (HELDOUT_TRIPLES, TRAIN_TRIPLES, ImageFolderDataset, ShapesDataset, build_loader,
                                  caption_of)


def _png(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_shapes_deterministic_and_captioned():
    a, b = ShapesDataset(32, 50, seed=3), ShapesDataset(32, 50, seed=3)
    for i in (0, 7, 49):
        ia, ca = a[i]
        ib, cb = b[i]
        assert torch.equal(ia, ib) and ca == cb
        assert ia.shape == (3, 32, 32) and 0 <= float(ia.min()) and float(ia.max()) <= 1
        s = a.spec(i)
        assert ca == caption_of(s) and ca.startswith(f"a {s.color} {s.shape} ") and ca.endswith(f"on a {s.background} background")
    assert not torch.equal(ShapesDataset(32, 50, seed=4)[0][0], a[0][0]) or ShapesDataset(32, 50, seed=4)[0][1] != a[0][1]


def test_shapes_heldout_combinations_never_in_training():
    held = set(HELDOUT_TRIPLES)
    assert held and not held & set(TRAIN_TRIPLES)
    train = ShapesDataset(16, 500, seed=0)
    seen = {(s.color, s.shape, s.background) for s in (train.spec(i) for i in range(len(train)))}
    assert not seen & held
    ev = ShapesDataset(16, 50, seed=1, split="heldout")
    assert all((s.color, s.shape, s.background) in held for s in (ev.spec(i) for i in range(50)))
    # every word of the held-out prompts is seen in training
    words = {w for t in TRAIN_TRIPLES for w in t}
    assert all(w in words for t in HELDOUT_TRIPLES for w in t)


def test_shapes_colour_is_rendered():
    ds = ShapesDataset(64, 10, seed=0, jitter=False)
    s = ds.spec(0)
    img = ds[0][0]
    from wuerstchen_fast.data.shapes import COLORS, POSITIONS

    cx, cy, _ = POSITIONS[s.position]
    centre = img[:, int(cy * 64), int(cx * 64)] * 255
    corner = img[:, 0, 0] * 255 if s.position != "top left" else img[:, -1, -1] * 255
    assert torch.allclose(centre, torch.tensor(COLORS[s.color], dtype=torch.float32), atol=1)
    assert torch.allclose(corner, torch.tensor(COLORS[s.background], dtype=torch.float32), atol=1)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "a.txt").write_text("a red picture\n")
    (tmp_path / "b.png").write_bytes(_png((0, 255, 0))[:60])  # truncated: corrupted
    (tmp_path / "b.txt").write_text("a broken picture")
    (tmp_path / "c.png").write_bytes(_png((0, 0, 255)))  # no caption file
    (tmp_path / "d.jpg").write_bytes(b"not an image at all")
    (tmp_path / "d.txt").write_text("garbage")
    return tmp_path


def test_folder_corrupted_images_are_skipped_and_counted(folder):
    ds = ImageFolderDataset(folder)
    assert len(ds) == 4
    assert ds[1][0] is None and ds[3][0] is None  # unreadable: None, never an exception
    loader = build_loader("folder", path=folder, global_batch=2, resolution=16, shuffle=False)
    seen = []
    for _ in range(4):
        imgs, caps = loader.next_batch()
        assert imgs.shape == (2, 3, 16, 16)
        seen += caps
    assert "a broken picture" not in seen and "garbage" not in seen
    assert loader.counters["unreadable_images"] == 4  # two bad files, two epochs


def test_folder_missing_caption_trains_unconditional_or_skips(folder):
    loader = build_loader("folder", path=folder, global_batch=2, resolution=16, shuffle=False)
    caps = loader.next_batch()[1] + loader.next_batch()[1]
    assert "" in caps and "a red picture" in caps
    assert loader.counters["missing_captions"] == 1
    skip = build_loader("folder", path=folder, global_batch=2, resolution=16, shuffle=False, missing_caption="skip")
    caps = skip.next_batch()[1] + skip.next_batch()[1]
    assert "" not in caps and skip.counters["missing_captions"] >= 1


def test_webdataset_shards_skip_bad_samples(tmp_path):
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for i in range(3):
                key = f"s{s}_{i}"
                add(tar, f"{key}.png", _png((50 * i, 0, 0)) if (s, i) != (0, 1) else b"\x89PNG corrupted")
                if (s, i) != (1, 2):
                    add(tar, f"{key}.txt", f"caption {s} {i}".encode())
    loader = build_loader("webdataset", path=str(tmp_path / "shard-{000..001}.tar"), global_batch=5, resolution=8)
    imgs, caps = loader.next_batch()
    assert imgs.shape == (5, 3, 8, 8)
    assert caps == ["caption 0 0", "caption 0 2", "caption 1 0", "caption 1 1", ""]
    assert loader.counters["unreadable_images"] == 1 and loader.counters["missing_captions"] == 1
    state = loader.state_dict()
    nxt = loader.next_batch()[1]
    again = build_loader("webdataset", path=str(tmp_path / "shard-*.tar"), global_batch=5, resolution=8)
    again.load_state_dict(state)
    assert again.next_batch()[1] == nxt  # resumes at the same sample, across the epoch boundary


def test_loader_resume_and_rank_split_give_the_same_global_batches():
    one = build_loader("shapes", global_batch=4, resolution=16, length=10, seed=5)
    batches = [one.next_batch()[1] for _ in range(5)]  # crosses two epoch boundaries (10 // 4 = 2 per epoch)
    r0 = build_loader("shapes", global_batch=4, resolution=16, length=10, seed=5, rank=0, world=2)
    r1 = build_loader("shapes", global_batch=4, resolution=16, length=10, seed=5, rank=1, world=2)
    for b in batches:
        assert r0.next_batch()[1] + r1.next_batch()[1] == b
    re = build_loader("shapes", global_batch=4, resolution=16, length=10, seed=5)
    for _ in range(3):
        re.next_batch()
    state = re.state_dict()
    fresh = build_loader("shapes", global_batch=4, resolution=16, length=10, seed=5)
    fresh.load_state_dict(state)
    assert [fresh.next_batch()[1] for _ in range(2)] == batches[3:]


def test_training_run_logs_skipped_images(folder, tmp_path):
    import json

    from _train_helpers import tiny_overrides
    from wuerstchen_fast.training import load_config, train

    out = tmp_path / "run"
    ov = tiny_overrides("stage_a", out) + ["data.kind=folder", f"data.path={folder}", "train.batch_size=2", "train.steps=3"]
    r = train(load_config(None, ov))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["unreadable_images"] == r.counters["unreadable_images"] > 0
    assert last["missing_captions"] == r.counters["missing_captions"] > 0


def test_shapes_short_captions_drop_only_the_position_phrase():
    full, short = ShapesDataset(32, 400, seed=3), ShapesDataset(32, 400, seed=3, short_captions=0.3)
    n_short = 0
    for i in range(400):
        s = full.spec(i)
        assert short.spec(i) == s  # the picture does not depend on the caption choice
        cap = short.caption(i)
        assert cap in (caption_of(s), caption_of(s, with_position=False))
        n_short += cap == f"a {s.color} {s.shape} on a {s.background} background"
    assert 0.22 < n_short / 400 < 0.38, n_short  # ~Binomial(400, 0.3): 4 sigma either side
    assert [short.caption(i) for i in range(50)] == [ShapesDataset(32, 400, seed=3, short_captions=0.3)[i][1]
                                                    for i in range(50)]
    assert torch.equal(short[5][0], full[5][0])
    with pytest.raises(ValueError, match="short_captions is a probability"):
        ShapesDataset(32, 4, short_captions=1.5)
