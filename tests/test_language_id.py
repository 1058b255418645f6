"""language_id: a fastText model trained in the test, saved to a file and loaded back by the stage."""

from __future__ import annotations

import pytest

from curate.schema import documents_batch
from curate.testing import _paragraphs
from tests.conftest import make_stage

fasttext = pytest.importorskip("fasttext", reason="the `quality` extra is not installed")


def _reversed(text: str) -> str:
    """A stand-in second "language": every word spelled backwards."""
    return " ".join(w[::-1] for w in text.split())


@pytest.fixture(scope="module")
def lid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lid")
    paras = [p.replace("\n", " ") for p in _paragraphs() if len(p) > 200][:1200]
    train = folder / "train.txt"
    train.write_text("".join(f"__label__en {p}\n__label__rev {_reversed(p)}\n" for p in paras[:1000]))
    model = fasttext.train_supervised(input=str(train), epoch=5, dim=16, minn=2, maxn=4, thread=1, seed=1)
    model.save_model(str(folder / "lid.bin"))
    return folder / "lid.bin", paras[1000:]


def _stage(path, **params):
    return make_stage("language_id", model=str(path), **params)


def test_labels_and_scores_equal_fasttext(lid):
    path, held_out = lid
    texts = held_out[:40] + [_reversed(t) for t in held_out[:40]]
    stage, ctx = _stage(path, min_score=None)
    scores = stage.score(documents_batch([f"d{i}" for i in range(len(texts))], texts), ctx)
    model = fasttext.load_model(str(path))
    labels, probs = model.predict([t.replace("\n", " ") for t in texts], k=1)
    assert scores["language"].to_pylist() == [lab[0].removeprefix("__label__") for lab in labels]
    assert scores["language_score"].to_pylist() == pytest.approx([min(float(p[0]), 1.0) for p in probs])
    langs = scores["language"].to_pylist()
    assert sum(lang == "en" for lang in langs[:40]) >= 36 and sum(lang == "rev" for lang in langs[40:]) >= 36


def test_keeps_only_the_languages_asked_for(lid):
    path, held_out = lid
    texts = held_out[:20] + [_reversed(t) for t in held_out[:20]]
    stage, ctx = _stage(path, languages=["en"], min_score=0.55)
    out = list(stage.run(iter([documents_batch([f"d{i}" for i in range(40)], texts)]), ctx))
    kept = [i for b in out for i in b.column("id").to_pylist()]
    drops = dict(ctx.stats["language_id"].drops)
    assert all(int(i[1:]) < 20 for i in kept) and len(kept) >= 15
    assert drops.get("language_not_kept", 0) >= 18 and sum(drops.values()) + len(kept) == 40


def test_a_missing_model_file_is_a_clear_error(tmp_path):
    from curate.errors import ConfigError

    with pytest.raises(ConfigError, match="no fastText model file"):
        _stage(tmp_path / "lid.176.bin")


def test_the_model_loads_once_per_worker_process(lid):
    from curate import models

    models.clear()
    for _ in range(3):  # setup runs once per shard; the model loads once per process
        _stage(lid[0])
    assert models.LOADS["fasttext"] == 1
