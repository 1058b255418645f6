"""The teacher tasks beyond IN2 QA — long_doc_qa, verify (with the pairwise judge), caption,
caption_fuse, chat_tokens — against the scripted loopback server, and the transformers backend."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli, make_text, write_jsonl, write_manifest
from tests.fake_openai import FakeOpenAI, message_text
from tests.test_teachers import _teacher

pytest.importorskip("openai", reason="the `llm` extra is not installed")


def _rows(run: Path, sink: str = "parquet") -> list[dict]:
    return pq.read_table(sorted((run / sink).glob("*.parquet"))).to_pylist()


def _stats(run: Path, label: str) -> dict:
    return json.loads((run / "stats.json").read_text())["stages"][label]


def _books(folder: Path, n: int = 6, paragraphs: int = 40) -> Path:
    rows = [{"id": f"b{i}", "text": "\n".join(make_text(i * 100 + k, 25) for k in range(paragraphs))} for i in range(n)]
    write_jsonl(folder / "books.jsonl", rows)
    return folder


def _manifest(tmp: Path, stages: str, source: str | None = None, sink: str = "{kind: parquet}",
              tokenizer: str = "{train: {vocab_size: 400, min_frequency: 1}}") -> Path:
    source = source or f'{{kind: jsonl, paths: ["{_books(tmp / "data")}/*.jsonl"], id_field: id}}'
    stages = stages.replace("\n", "\n        ")  # keep every stage line under the dedented `stages:`
    return write_manifest(tmp / "m.yaml", f"""
        name: tasks
        seed: 11
        source: {source}
        tokenizer: {tokenizer}
        stages:
        {stages}
        sink: {sink}
        executor: {{kind: local, workers: 1}}
        """)


def test_long_doc_qa_asks_over_several_chunks_of_the_whole_document(tmp_path):
    with FakeOpenAI() as fake:
        m = _manifest(tmp_path, f"  - long_doc_qa: {{chunk_tokens: 100, questions_per_doc: 2, teacher: {_teacher(fake)}}}")
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    rows = _rows(tmp_path / "run")
    books = {json.loads(x)["id"]: json.loads(x)["text"] for x in (tmp_path / "data" / "books.jsonl").read_text().splitlines()}
    drops = _stats(tmp_path / "run", "long_doc_qa")["drops"]
    assert len(rows) + drops.get("unparsable", 0) == 12 and len(rows) >= 8  # the fake may repeat a number
    for r in rows:
        user, assistant = r["messages"]
        doc = books[r["id"].split("#")[0]]
        assert doc in user["content"] and assistant["content"] == r["answer"]
        assert len(r["evidence"]) >= 2
        for e in r["evidence"]:
            span = user["content"][e["char_offset"]:e["char_end"]]
            assert span and span in doc
        lineage = json.loads(r["lineage"])
        assert {e["chunk"] for e in r["evidence"]} <= set(lineage["shown"])


def test_verify_drops_unsupported_answers_and_the_judge_picks_a_candidate(tmp_path):
    def responder(req):
        text = message_text(req["messages"][-1]["content"])
        if "Answer A:" in text:  # the judge prefers the answer that says "right"
            a = text.split("Answer A:")[1].split("Answer B:")[0]
            return {"content": {"better": "A" if "right" in a else "B", "reason": "r"}}
        if "Decide whether the answer" in text:
            answer = text.split("Answer:")[-1]
            return {"content": {"supported": "right" in answer or "answer " in answer, "reason": "r"}}
        return None

    with FakeOpenAI(responder=responder) as fake:
        stages = (f"  - segment_qa: {{min_tokens: 100, max_tokens: 400, segment_tokens: 32, teacher: {_teacher(fake)}}}\n"
                  f"  - verify: {{teacher: {_teacher(fake)}}}")
        m = _manifest(tmp_path, stages)
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
        rows = _rows(tmp_path / "run")
        assert rows and all(r["scores"]["verify"]["supported"] == 1.0 for r in rows)
    # judge: candidates in a column; the best one ("right") replaces the answer and the assistant turn
    import pyarrow as pa

    (tmp_path / "qa").mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": f"q{i}", "question": "Which?", "answer": "wrong one",
                                          "candidates": ["also wrong", f"the right one {i}"], "evidence": "facts"}
                                         for i in range(5)]), tmp_path / "qa" / "qa.parquet")
    with FakeOpenAI(responder=responder) as fake:
        m = write_manifest(tmp_path / "j.yaml", f"""
            name: judge
            source: {{kind: parquet, paths: ["{tmp_path}/qa/*.parquet"], schema: table, id_field: key}}
            stages:
              - verify: {{evidence_column: evidence, candidates_column: candidates, teacher: {_teacher(fake)}}}
            sink: {{kind: parquet}}
            """)
        proc = cli("run", str(m), "-o", str(tmp_path / "judge"), "--no-progress", check=False)
    if proc.returncode != 0:
        pytest.fail(proc.stdout + proc.stderr)
    rows = _rows(tmp_path / "judge")
    assert [r["answer"] for r in rows] == [f"the right one {i}" for i in range(5)]


def _wds_pairs(folder: Path, photos) -> Path:
    folder.mkdir(parents=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for k, (name, data, caption) in enumerate(photos[:4]):
            for ext, payload in (("jpg", data), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{k:03d}-{name}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("999-broken.jpg")
        info.size = 12
        tar.addfile(info, io.BytesIO(b"not an image"))
        info = tarfile.TarInfo("999-broken.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"text"))
    return folder


def test_caption_by_two_teachers_ranked_by_clip_then_fused(tmp_path):
    pytest.importorskip("open_clip")
    from curate.testing import real_images, save_tiny_clip

    photos = real_images()
    shards = _wds_pairs(tmp_path / "pairs", photos)
    clip = save_tiny_clip(tmp_path / "clip")
    fused_prompts = {}

    def responder(req):
        content = req["messages"][-1]["content"]
        if isinstance(content, list):
            url = next(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
            assert url.startswith("data:image/png;base64,")
            return f"{req['model']} sees an image of {len(url)} characters, seed {req.get('seed')}"
        text = message_text(content)
        fused_prompts[text] = True
        return "fused: " + text[-60:]

    with FakeOpenAI(responder=responder) as fake:
        t1, t2 = _teacher(fake, model="vlm-a"), _teacher(fake, model="vlm-b")
        stages = (f"  - caption: {{samples: 2, teacher: {t1}, more_teachers: [{t2}]}}\n"
                  f"  - clip_score: {{model: {clip}, texts_column: captions}}\n"
                  f"  - caption_fuse: {{top_k: 2, rank_column: scores.clip_score.text_scores, teacher: {_teacher(fake)}}}")
        m = _manifest(tmp_path, stages, source=f'{{kind: webdataset, paths: ["{shards}/*.tar"], schema: interleaved}}',
                      tokenizer="null")
        cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    rows = _rows(tmp_path / "run")
    assert len(rows) == 4
    for r in rows:
        assert len(r["captions"]) == 4 and r["caption_teachers"] == ["vlm-a", "vlm-a", "vlm-b", "vlm-b"]
        assert r["caption"].startswith("fused: ") and len(r["images"]) == 1
        assert r["messages"][0]["content"].startswith("<image>") and r["messages"][1]["content"] == r["caption"]
        # the two candidates CLIP ranks highest are the ones the fusion prompt showed, best first
        scores = r["scores"]["clip_score"]["text_scores"]
        top = sorted(range(4), key=lambda k: (-scores[k], k))[:2]
        prompt = next(p for p in fused_prompts if r["captions"][top[0]] in p)
        assert f"1. {r['captions'][top[0]]}" in prompt and f"2. {r['captions'][top[1]]}" in prompt
        assert all(r["captions"][k] not in prompt for k in range(4) if k not in top)
    st = _stats(tmp_path / "run", "caption")
    assert st["drops"] == {"undecodable_image": 1}


def test_chat_tokens_trains_only_the_assistant_turns(tmp_path):
    data = tmp_path / "chat"
    convs = [{"id": f"c{i}", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": make_text(i, 20) + " <|im_start|>"},
                                          {"role": "assistant", "content": f"reply number {i}"},
                                          {"role": "user", "content": "and then?"},
                                          {"role": "assistant", "content": f"second reply {i}"}]} for i in range(6)]
    write_jsonl(data / "c.jsonl", convs)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    for name, params in (("plain", "{}"), ("jinja", f"{{template: {template}}}")):
        m = write_manifest(tmp_path / f"{name}.yaml", f"""
            name: chat
            source: {{kind: parquet, paths: ["{tmp_path}/chat.parquet"], schema: table}}
            tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
            stages:
              - chat_tokens: {params}
              - pack: {{seq_len: 512}}
            sink: {{kind: parquet}}
            """)
        import pyarrow as pa

        from synthesizers.teachers.task import MESSAGES
        pq.write_table(pa.table({"id": [c["id"] for c in convs],
                                 "messages": pa.array([c["messages"] for c in convs], MESSAGES)}),
                       tmp_path / "chat.parquet")
        if name == "jinja":  # the template's markers must be special tokens of the run tokenizer
            tok_dir = tmp_path / "tok"
            from curate.tokenizer import TrainSpec, train_bpe

            bpe = train_bpe(TrainSpec(vocab_size=400, min_frequency=1), [make_text(i, 50) for i in range(100)])
            from tokenizers import AddedToken

            bpe.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
            tok_dir.mkdir()
            bpe.save(str(tok_dir / "tokenizer.json"))
            m.write_text(m.read_text().replace("tokenizer: {train: {vocab_size: 400, min_frequency: 1}}",
                                               f"tokenizer: {{path: {tok_dir}}}"))
        cli("run", str(m), "-o", str(tmp_path / name), "--no-progress")
        from curate.tokenizer import CurateTokenizer

        tok = CurateTokenizer.load_run(tmp_path / name / "tokenizer")
        rows = _rows(tmp_path / name)
        ids = np.concatenate([np.asarray(r["input_ids"]) for r in rows])
        mask = np.concatenate([np.asarray(r["loss_mask"]) for r in rows])
        trained = tok.decode(ids[mask == 1].tolist(), show_special=True)
        for i in range(6):
            assert f"reply number {i}" in trained and f"second reply {i}" in trained
        assert "be brief" not in trained and "and then" not in trained
        untrained = tok.decode(ids[mask == 0].tolist(), show_special=True)
        assert "and then?" in untrained
        if name == "jinja":
            start = tok.tk.token_to_id("<|im_start|>")
            # the template's own marker is one special token; the same string inside a user's text is not
            assert int((ids == start).sum()) == 6 * 5
            assert trained.count("<|im_end|>") == 12  # the end of each assistant turn is trained


@pytest.mark.slow
def test_transformers_backend_on_a_tiny_local_model(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.conftest import save_tiny_lm

    model = save_tiny_lm(tmp_path / "tiny", n_positions=256)
    tk = transformers.AutoTokenizer.from_pretrained(model)
    tk.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
                       "{% if add_generation_prompt %}assistant:{% endif %}"
    tk.save_pretrained(model)
    teacher = json.dumps({"backend": "transformers", "model": str(model), "device": "cpu",
                          "sampling": {"temperature": 0.8, "max_tokens": 12}})
    data = tmp_path / "data"
    write_jsonl(data / "d.jsonl", [{"id": f"d{i}", "text": make_text(i, 30)} for i in range(4)]
                + [{"id": "long", "text": make_text(99, 400)}])
    m = write_manifest(tmp_path / "m.yaml", f"""
        name: tf
        seed: 1
        source: {{kind: jsonl, paths: ["{data}/*.jsonl"], id_field: id}}
        tokenizer: {{train: {{vocab_size: 400, min_frequency: 1}}}}
        stages:
          - summarize: {{chunk_tokens: 10000, teacher: {teacher}}}
        sink: {{kind: parquet}}
        """)
    cli("run", str(m), "-o", str(tmp_path / "run"), "--no-progress")
    rows = {r["id"]: r for r in _rows(tmp_path / "run")}
    st = _stats(tmp_path / "run", "summarize")
    # the long document's prompt exceeds the model's 256 positions: skipped and counted, never sent
    assert "long" not in rows and st["drops"].get("context_length") == 1
    # empty generations (a random model may stop at once) are counted, never kept as empty summaries
    assert len(rows) + st["drops"].get("unparsable", 0) == 4
    assert all(r["summary"] for r in rows.values())
    assert st["metrics"]["completion_tokens"]["sum"] > 0
    # a fresh run (no cache) writes the same bytes: each request has its own seed
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "parquet").glob("*.parquet")}
    cli("run", str(m), "-o", str(tmp_path / "run3"), "--no-progress")
    after = {p.name: p.read_bytes() for p in (tmp_path / "run3" / "parquet").glob("*.parquet")}
    assert before == after


ROOT = Path(__file__).resolve().parents[1]


def _jsonl_corpus(path: Path, target_bytes: int, **kw) -> Path:
    """``write_jsonl_corpus`` cut back to about ``target_bytes``: it writes 256 documents at a time, so a
    small target (500 KB of ~4 KB documents, 400 KB of ~40 KB books) would give 1 MB and 10 MB."""
    from curate.testing import write_jsonl_corpus

    write_jsonl_corpus(path, target_bytes, **kw)
    lines, size = [], 0
    with open(path, "rb") as fh:
        for line in fh:
            if size >= target_bytes:
                break
            lines.append(line)
            size += len(line)
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.slow
def test_teacher_recipes_run_against_a_server(tmp_path, monkeypatch):
    """The shipped in2-longqa-32k, book-qa and dense-captions manifests, as their usage comments say,
    pointed at a loopback server."""
    import functools

    import curate.testing
    from curate.testing import real_images
    from curate.tokenizer import TrainSpec, train_bpe

    # both corpora draw from the same paragraphs (the stdlib's docstrings, ~4 s to collect): collect once
    monkeypatch.setattr(curate.testing, "_paragraphs", functools.cache(curate.testing._paragraphs))
    corpus = _jsonl_corpus(tmp_path / "corpus.jsonl", 500_000)  # ~115 documents of ~4 KB
    books = _jsonl_corpus(tmp_path / "books.jsonl", 400_000, paragraphs_per_doc=(200, 400))  # ~10-20K tokens each
    tok = tmp_path / "tok"
    tok.mkdir()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()[:200]]
    train_bpe(TrainSpec(vocab_size=2000), texts).save(str(tok / "tokenizer.json"))
    pairs = _wds_pairs(tmp_path / "pairs", real_images())

    def responder(req):
        text = message_text(req["messages"][-1]["content"])
        if "Decide whether the answer" in text:
            return {"content": {"supported": True, "reason": "found"}}
        return None

    with FakeOpenAI(responder=responder, latency=0.002) as fake:
        env = {"CORPUS": str(corpus), "BOOKS": str(books), "TOKENIZER": str(tok), "PAIRS": str(pairs / "*.tar"),
               "TEACHER_URL": fake.base_url, "VLM_URL": fake.base_url, "VLM2_URL": fake.base_url,
               "LLM_URL": fake.base_url}
        for recipe in ("in2-longqa-32k", "book-qa", "dense-captions"):
            cli("run", str(ROOT / "manifests" / f"{recipe}.yaml"), "-o", str(tmp_path / recipe), "--no-progress",
                env=env)
    in2 = pq.read_table(sorted((tmp_path / "in2-longqa-32k" / "parquet").glob("*.parquet")))
    assert in2.num_rows > 0 and max(in2.column("n_tokens").to_pylist()) <= 32768
    st = json.loads((tmp_path / "in2-longqa-32k" / "stats.json").read_text())["stages"]
    assert st["segment_qa"]["rows_out"] > 10 and st["verify"]["rows_out"] == st["segment_qa"]["rows_out"]
    books = _rows(tmp_path / "book-qa")
    assert books and all(len(r["evidence"]) >= 2 for r in books)
    captions = _rows(tmp_path / "dense-captions")
    assert len(captions) == 4 and all(len(r["captions"]) == 4 and r["caption"] for r in captions)
