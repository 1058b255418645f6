"""Image decoding for the CLIP stages: threads and processes give the model exactly the per-image
transform's pixels, bad images are reported in place, and decoding processes never outlive their owner."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

open_clip = pytest.importorskip("open_clip", reason="the `clip` extra is not installed")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def photos():
    from curate.testing import real_images

    return real_images(size=200)


@pytest.fixture(scope="module")
def preprocess(tmp_path_factory):
    from curate.testing import save_tiny_clip

    folder = save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return open_clip.create_model_and_transforms(f"local-dir:{folder}")[2]


def _png_with_alpha() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (90, 40), (10, 200, 30, 128)).save(buf, "PNG")
    return buf.getvalue()


def _decode_all(blobs, preprocess, **kw):
    from filters import clip_decode

    timings: dict = {}
    out = list(clip_decode.batches(blobs, preprocess, kw.pop("size", 4), torch=torch, device="cpu",
                                   dtype=torch.float32, timings=timings, **kw))
    assert timings["decode_s"] >= 0 and timings["wait_s"] >= 0
    return out


def _expected(blobs, preprocess, max_pixels):
    from curate.images import ImageProblem, decode_rgb

    tensors, reasons = [], []
    for b in blobs:
        try:
            tensors.append(preprocess(decode_rgb(b, max_pixels)))
            reasons.append(None)
        except ImageProblem as p:
            reasons.append(p.reason)
    return torch.stack(tensors), reasons


def test_open_clip_preprocessing_splits_where_the_image_becomes_a_tensor(preprocess):
    from torchvision import transforms as T

    from filters.clip_decode import split

    pil_steps, tensor_steps = split(preprocess)
    assert [type(s).__name__ for s in pil_steps.transforms] == ["Resize", "CenterCrop", "MaybeConvertMode"]
    assert [type(s).__name__ for s in tensor_steps] == ["Normalize"]
    custom = T.Compose([T.Resize(32), T.ToTensor(), T.Lambda(lambda x: x * 2)])
    assert split(custom) is None  # a step after the tensor that is not Normalize: run it whole
    assert split(lambda im: im) is None


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_batches_hold_exactly_the_per_image_transform_pixels(photos, preprocess, processes):
    big = photos[0][1]
    blobs = [b for _, b, _ in photos] + [b"not an image", _png_with_alpha(), big[: len(big) // 3]]
    max_pixels = 190 * 200  # the 200 px photos that are not square pass; the square ones are too large
    want, reasons = _expected(blobs, preprocess, max_pixels)
    got = _decode_all(blobs, preprocess, size=5, max_pixels=max_pixels, workers=3, processes=processes)
    assert [start for start, _, _ in got] == list(range(0, len(blobs), 5))
    problems = [p for _, _, ps in got for p in ps]
    assert [p.reason if p is not None else None for p in problems] == reasons
    assert {"image_too_large", "undecodable_image", None} == set(reasons)
    tensors = torch.cat([t for _, t, _ in got if t is not None])
    assert tensors.dtype == torch.float32 and tensors.shape == want.shape
    assert torch.equal(tensors, want)  # the same float32 operations: identical, not merely close


def test_a_transform_that_cannot_be_split_runs_whole_per_image(photos):
    from torchvision import transforms as T

    custom = T.Compose([T.Resize(24), T.CenterCrop(24), T.ToTensor(), T.Lambda(lambda x: x.flip(-1))])
    blobs = [b for _, b, _ in photos][:6]
    want, _ = _expected(blobs, custom, 10**9)
    got = _decode_all(blobs, custom, max_pixels=10**9, workers=2, processes=True)  # falls back to threads
    assert torch.equal(torch.cat([t for _, t, _ in got]), want)


def test_steps_that_do_not_pickle_and_daemon_parents_decode_in_threads(photos, preprocess, monkeypatch):
    import multiprocessing

    from torchvision import transforms as T

    from filters import clip_decode

    local = T.Compose([T.Lambda(lambda im: im), T.Resize(24), T.CenterCrop(24), T.ToTensor()])
    assert clip_decode.split(local) is not None and not clip_decode._can_use_processes(clip_decode.split(local)[0])
    blobs = [b for _, b, _ in photos][:5]
    want, _ = _expected(blobs, local, 10**9)
    got = _decode_all(blobs, local, max_pixels=10**9, workers=2, processes=True)
    assert torch.equal(torch.cat([t for _, t, _ in got]), want)
    pil_steps = clip_decode.split(preprocess)[0]
    assert clip_decode._can_use_processes(pil_steps)
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True, raising=False)
    assert not clip_decode._can_use_processes(pil_steps)  # a Dask worker may not start processes


def test_preprocessing_that_leaves_sizes_unequal_is_a_clear_error(photos):
    from torchvision import transforms as T

    uneven = T.Compose([T.Resize(20), T.ToTensor()])  # no crop: landscape and portrait photos differ
    blobs = [b for _, b, _ in photos]
    with pytest.raises(ValueError, match="different sizes"):
        _decode_all(blobs, uneven, size=len(blobs), max_pixels=10**9, workers=2, processes=False)


def test_the_process_pool_is_started_once_per_process(photos, preprocess):
    from filters import clip_decode

    blobs = [b for _, b, _ in photos][:4]
    _decode_all(blobs, preprocess, max_pixels=10**9, workers=2, processes=True)
    pool = clip_decode.process_pool(2)
    _decode_all(blobs, preprocess, max_pixels=10**9, workers=2, processes=True)
    assert clip_decode.process_pool(2) is pool


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_a_consumer_that_stops_early_leaves_no_thread_behind(photos, preprocess, processes):
    import threading

    from filters import clip_decode

    blobs = [b for _, b, _ in photos] * 4
    gen = clip_decode.batches(blobs, preprocess, 2, torch=torch, device="cpu", dtype=torch.float32,
                              max_pixels=10**9, workers=2, processes=processes, timings={})
    next(gen)
    gen.close()
    deadline = time.time() + 10
    while any(t.name == "clip-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith(("clip-prefetch", "clip-decode")) for t in threading.enumerate())


def test_decoding_processes_exit_when_their_owner_is_killed(tmp_path):
    import psutil

    script = textwrap.dedent("""
        import sys, time
        import torch
        from curate.testing import real_images, save_tiny_clip
        from filters import clip_decode
        from filters.clip_model import import_open_clip
        folder = save_tiny_clip(sys.argv[1])
        pre = import_open_clip().create_model_and_transforms(f"local-dir:{folder}")[2]
        blobs = [b for _, b, _ in real_images(size=128)]
        list(clip_decode.batches(blobs, pre, 4, torch=torch, device="cpu", dtype=torch.float32,
                                 max_pixels=10**9, workers=2, processes=True, timings={}))
        print("ready", flush=True)
        time.sleep(120)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "clip")], stdout=subprocess.PIPE,
                             text=True, cwd=os.getcwd())
    try:
        assert owner.stdout.readline().strip() == "ready"
        children = psutil.Process(owner.pid).children(recursive=True)
        decoders = [c for c in children if "spawn_main" in " ".join(c.cmdline())]  # not the resource tracker
        assert len(decoders) >= 2
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        gone, alive = psutil.wait_procs(decoders, timeout=15)
        assert not alive, f"decoders outlived their owner: {[p.pid for p in alive]}"
    finally:
        if owner.poll() is None:
            owner.kill()


def test_clip_score_gives_the_same_scores_with_threads_and_processes(tmp_path, photos):
    import pyarrow as pa

    from curate.schema import IMAGE
    from curate.testing import save_tiny_clip
    from tests.conftest import make_stage

    folder = save_tiny_clip(tmp_path / "tiny")
    rows = photos + [("broken", b"\x89PNG broken", "nothing")]
    batch = pa.RecordBatch.from_pydict({
        "id": [n for n, _, _ in rows], "texts": [[c] for _, _, c in rows],
        "images": [[{"bytes": b, "mime": None, "sha256": None, "width": None, "height": None}] for _, b, _ in rows],
    }, schema=pa.schema([("id", pa.string()), ("texts", pa.list_(pa.string())), ("images", pa.list_(IMAGE))]))
    scores = {}
    for processes in (False, True):
        stage, ctx = make_stage("clip_score", tmp_path / f"run-{processes}", model=str(folder), batch_size=4,
                                decode_processes=processes, decode_workers=2)
        scores[processes] = stage.score(batch, ctx)["score"].to_pylist()
    assert scores[False] == scores[True]
    assert scores[True][-1] is None and all(s is not None for s in scores[True][:-1])


class CrashOnWidth:
    """A PIL step that kills its process on an image of one width (a native decoder crashing on a
    hostile file), and otherwise passes the image on. Module level: the decoding processes unpickle it."""

    def __init__(self, width: int):
        self.width = width

    def __call__(self, im):
        if im.size[0] == self.width:
            os._exit(3)
        return im


def test_a_decoder_that_crashes_its_process_costs_that_image_alone(photos):
    from PIL import Image
    from torchvision import transforms as T


    def jpeg(width):
        buf = io.BytesIO()
        Image.new("RGB", (width, 50), (width % 255, 80, 160)).save(buf, "JPEG")
        return buf.getvalue()

    blobs = [jpeg(w) for w in (60, 61, 77, 62, 63)] + [jpeg(64)] * 12
    pre = T.Compose([CrashOnWidth(77), T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize([0.5] * 3, [0.2] * 3)])
    got = _decode_all(blobs, pre, size=len(blobs), max_pixels=10**9, workers=2, processes=True)
    problems = [p for _, _, ps in got for p in ps]
    assert [k for k, p in enumerate(problems) if p is not None] == [2]
    assert problems[2].reason == "undecodable_image" and "crashed" in problems[2].detail
    survivors = [b for k, b in enumerate(blobs) if k != 2]
    want = torch.stack([T.Compose(pre.transforms[1:])(Image.open(io.BytesIO(b)).convert("RGB")) for b in survivors])
    assert torch.equal(torch.cat([t for _, t, _ in got if t is not None]), want)
    # the pool that replaced the broken one works for the next batch
    again = _decode_all(survivors[:3], pre, max_pixels=10**9, workers=2, processes=True)
    assert all(p is None for _, _, ps in again for p in ps)
