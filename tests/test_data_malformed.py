"""One test per class of malformed input (issue 20, item 1; the contract is the table in docs/data.md):
each gets an error naming the file, the row and the field, or, with skip_bad_rows, is quarantined and
counted while the good rows are kept. Every malformed file is built here, in tmp_path."""

import gzip
import json
import logging

import pyarrow as pa
import pytest

from pipeline.data import RecordError, read_records, write_records
from pipeline.data.records import EmptyInput, UnsupportedFormat
from pipeline.data.stream import quarantine_count, quarantine_rows, read_dataset

MSG = [{"role": "user", "content": "q"}]


def sft(i, **kw):
    return {"id": f"f{i}", "prompt": MSG, "completion": f"answer {i}", **kw}


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_unsupported_file_in_shard_dir_is_an_error_naming_it(tmp_path):
    """Was: a .csv (or any other file) in a shard directory was skipped without a word."""
    d = tmp_path / "shards"
    jsonl(d / "a.jsonl", [sft(0)])
    (d / "b.csv").write_text("id,prompt,completion\nf1,q,a\n")
    with pytest.raises(UnsupportedFormat, match=r"b\.csv.*supported: \.parquet, \.jsonl"):
        read_records(str(d), "sft")
    # Documentation (a hub download's README) and a job's config.yaml next to the shards are skipped,
    # logged and reported.
    (d / "b.csv").unlink()
    (d / "README.md").write_text("# my data\n")
    (d / "config.yaml").write_text("out_dir: x\n")
    t, report = read_records(str(d), "sft")
    assert t.num_rows == 1 and report.skipped_files == [str(d / "README.md"), str(d / "config.yaml")]


def test_save_to_disk_folder_inside_a_shard_dir_is_read_as_a_data_set(tmp_path):
    """Was: its dataset_info.json / state.json were read as JSON-lines shards (and its .arrow skipped)."""
    import datasets

    d = tmp_path / "shards"
    jsonl(d / "a.jsonl", [sft(0)])
    datasets.Dataset.from_list([sft(1), sft(2)]).save_to_disk(str(d / "saved"))
    t, _ = read_records(str(d), "sft")
    assert sorted(t.column("id").to_pylist()) == ["f0", "f1", "f2"]


def test_same_named_shards_in_two_folders_keep_their_own_quarantine_files(tmp_path):
    """Was: both wrote <q>/part.jsonl.quarantine.jsonl, the second overwriting the first."""
    q = tmp_path / "q"
    a = jsonl(tmp_path / "a" / "part.jsonl", [sft(0), sft(1, completion=3)])
    b = jsonl(tmp_path / "b" / "part.jsonl", [sft(2), sft(3, completion=4)])
    t, report = read_records([a, b], "sft", skip_bad_rows=True, quarantine_dir=str(q))
    assert t.num_rows == 2 and report.quarantined == 2 and quarantine_count(str(q)) == 2
    assert sorted(r["source"] for r in quarantine_rows(str(q))) == [a, b]
    read_records([a, b], "sft", skip_bad_rows=True, quarantine_dir=str(q))
    assert quarantine_count(str(q)) == 2  # reading again rewrites each shard's own file: no doubling


@pytest.mark.parametrize("line,field,words", [
    (b'{"id": "f1", "prompt": "q", "completion": "caf\xe9"}', "completion", "not valid UTF-8"),  # Latin-1 byte
    (b'{"id": "f1", "prompt": "q", "completion": "x\\ud800y"}', "completion", "lone surrogate"),
    (b'{"id": "f1", "prompt": [{"role": "user", "content": "\\udc80"}], "completion": "a"}', "prompt.0.content",
     "not valid UTF-8"),
    (b'{"id": "f1", "prompt": "q", "completion": "a", "x": ' + b"1" * 5000 + b"}", "<json>", "digits"),
    (b'{"id": "f1", "prompt": "q", "completion": "a", "x": ' + b"[" * 100_000 + b"}", "<json>", "recursion"),
    (b'{"id": "\xff\xfe", "prompt": "q", "completion": "a"}', "id", "not valid UTF-8"),
])
def test_undecodable_values_are_row_errors_and_quarantinable(tmp_path, line, field, words):
    """Was: a bare UnicodeDecodeError / ValueError / RecursionError / Arrow error ending the read, skip mode too."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(sft(0)).encode() + b"\n" + line + b"\n" + json.dumps(sft(2)).encode() + b"\n")
    with pytest.raises(RecordError) as e:
        read_records(str(path), "sft")
    assert (e.value.source, e.value.row, e.value.field) == (str(path), 1, field) and words in str(e.value)
    t, report = read_records(str(path), "sft", skip_bad_rows=True, quarantine_dir=str(tmp_path / "q"))
    assert t.column("id").to_pylist() == ["f0", "f2"] and report.quarantined == 1
    json.dumps(quarantine_rows(str(tmp_path / "q")))  # the quarantined record is plain JSON


@pytest.mark.parametrize("kind,row,field", [
    ("stepwise", {"id": "s", "prompt": MSG, "completions": ["a"], "objective": "o", "labels": [0.5],
                  "label_kind": "soft", "rollouts_per_step": 2 ** 40}, "rollouts_per_step"),  # int32 overflow
    ("problem", {"id": "p", "task": "t", "prompt": MSG, "meta": {"n": 10 ** 30}}, None),  # kept as JSON text: fine
])
def test_integer_overflow_is_a_row_error(tmp_path, kind, row, field):
    """Was: pyarrow's bare 'integer too large' at the end of the read."""
    path = jsonl(tmp_path / "d.jsonl", [row])
    if field is None:
        assert read_records(path, kind)[0].num_rows == 1
        return
    with pytest.raises(RecordError, match=rf"row 0: field '{field}': 1099511627776 does not fit int32"):
        read_records(path, kind)


def test_gzip_content_and_corrupt_gzip(tmp_path):
    """Was: gzip bytes in a .jsonl gave a bare UnicodeDecodeError. Gzip content is read whatever the name;
    a truncated gzip stream is an error naming the file and how far it got; other binary content is named."""
    rows = [sft(i) for i in range(3)]
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "zipped.jsonl").write_bytes(blob)
    assert read_records(str(tmp_path / "zipped.jsonl"), "sft")[0].num_rows == 3
    (tmp_path / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RecordError, match=r"cut\.jsonl\.gz: row \d: field '<file>': cannot be read past"):
        read_records(str(tmp_path / "cut.jsonl.gz"), "sft", skip_bad_rows=True)
    (tmp_path / "z.jsonl").write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 20)
    with pytest.raises(RecordError, match=r"z\.jsonl: row 0: field '<file>': is zstd content"):
        read_records(str(tmp_path / "z.jsonl"), "sft")


def test_files_that_exist_are_read_or_refused_by_format(tmp_path):
    """Was: 'no such file or directory' for a .csv, a .jsonl.gz and a glob, all of which exist."""
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps(sft(0)) + "\n")
    t, _ = read_records(str(tmp_path / "a.jsonl.gz"), "sft")
    assert t.column("id").to_pylist() == ["f0"]
    jsonl(tmp_path / "b.jsonl", [sft(1)])
    t, _ = read_records(str(tmp_path / "*.jsonl*"), "sft")  # a glob matching several files
    assert t.column("id").to_pylist() == ["f0", "f1"]
    (tmp_path / "c.csv").write_text("id,prompt,completion\nf2,q,a\n")
    with pytest.raises(UnsupportedFormat, match=r"c\.csv: unsupported format \(\.csv\).*convert it.*supported: "):
        read_records(str(tmp_path / "c.csv"), "sft")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        read_records(str(tmp_path / "*.parquet"), "sft")


def test_training_targets_out_of_range_are_row_errors_and_minus_100_is_unlabelled(tmp_path, caplog):
    """Was: soft labels of -100, 7 or 1e39 stored as MSE targets (1e39 as float32 inf)."""
    base = {"prompt": MSG, "completions": ["a", "b"], "objective": "o", "label_kind": "soft"}
    rows = [{**base, "id": "ok", "labels": [0.25, 1.0]},
            {**base, "id": "neg", "labels": [-0.5, 1.0]},
            {**base, "id": "big", "labels": [0.5, 7.0]},
            {**base, "id": "inf32", "labels": [0.5, 1e39]},
            {**base, "id": "trl", "labels": [-100, 1.0]},  # TRL's ignore index: unlabelled (null), counted
            {**base, "id": "hard", "label_kind": "hard", "labels": [-100, True]}]
    path = jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(RecordError, match=r"row 1: field 'labels.0': soft label -0.5 is outside \[0, 2\]"):
        read_records(path, "stepwise")
    with caplog.at_level(logging.WARNING):
        t, report = read_records(path, "stepwise", skip_bad_rows=True, quarantine_dir=str(tmp_path / "q"))
    assert t.column("id").to_pylist() == ["ok", "trl", "hard"]
    assert [r["labels"] for r in t.to_pylist()] == [[0.25, 1.0], [None, 1.0], [None, 1.0]]
    assert report.ignore_labels == 2 and "-100" in caplog.text
    assert [(b["row"], b["field"]) for b in quarantine_rows(str(tmp_path / "q"))] == [
        (1, "labels.0"), (2, "labels.1"), (3, "labels.1")]
    assert "overflows float32" in quarantine_rows(str(tmp_path / "q"))[2]["error"]
    # float32 overflow elsewhere (outcomes, pair scores) is refused the same way
    traj = {"id": "t", "problem_id": "p", "prompt": MSG, "steps": ["a"], "final": "a", "policy": "x", "outcome": 1e39}
    with pytest.raises(RecordError, match=r"row 0: field 'outcome': 1e\+39 overflows float32"):
        read_records(jsonl(tmp_path / "t.jsonl", [traj]), "trajectory")
    pair = {"id": "r", "prompt": MSG, "chosen": "a", "rejected": "b", "objective": "o",
            "scores": [{"objective": "o", "chosen": 1e39, "rejected": 0.0}]}
    with pytest.raises(RecordError, match=r"field 'scores.0.chosen': 1e\+39 overflows float32"):
        read_records(jsonl(tmp_path / "p.jsonl", [pair]), "preference")


def test_duplicate_ids_are_found_at_read_time_naming_both_rows(tmp_path):
    """Was: accepted, then a shard 'got fewer results than inputs' at the end of a rollout / labelling job."""
    a = jsonl(tmp_path / "a.jsonl", [sft(0), sft(1)])
    b = jsonl(tmp_path / "b.jsonl", [sft(2), sft(1)])
    with pytest.raises(RecordError, match=rf"b\.jsonl: row 1: field 'id': duplicate id 'f1': first at {a} row 1"):
        read_records([a, b], "sft")
    t, report = read_records([a, b], "sft", skip_bad_rows=True, quarantine_dir=str(tmp_path / "q"))
    assert t.column("id").to_pylist() == ["f0", "f1", "f2"] and report.quarantined == 1
    with pytest.raises(RecordError, match="duplicate id 'f0'"):
        read_records(jsonl(tmp_path / "c.jsonl", [sft(0), sft(0)]), "sft")
    with pytest.raises(RecordError, match="duplicate id 'f0'"):  # the same contract on the way out
        write_records([sft(0), sft(0)], tmp_path / "out.parquet", "sft")


def test_empty_inputs_warn_or_fail(tmp_path, caplog):
    """Was: zero rows accepted without a word (a job then trained or labelled nothing)."""
    full = jsonl(tmp_path / "d" / "a.jsonl", [sft(0)])
    (tmp_path / "d" / "b.jsonl").write_text("")
    (tmp_path / "d" / "c.json").write_text("[]")
    with caplog.at_level(logging.WARNING):
        t, report = read_records(str(tmp_path / "d"), "sft")
    assert t.num_rows == 1 and len(report.empty_files) == 2 and "b.jsonl: no rows" in caplog.text
    with pytest.raises(EmptyInput, match="no sft rows: every file is empty"):
        read_records([str(tmp_path / "d" / "b.jsonl"), str(tmp_path / "d" / "c.json")], "sft")
    bad = jsonl(tmp_path / "bad.jsonl", [sft(0, completion=1)])
    with pytest.raises(EmptyInput, match=r"all 1 rows were quarantined"):
        read_records(bad, "sft", skip_bad_rows=True, quarantine_dir=str(tmp_path / "q"))
    assert read_records(str(tmp_path / "d" / "b.jsonl"), "sft", allow_empty=True)[0].num_rows == 0
    # The Ray Data reader finds empty shards on the driver, before any task runs.
    write_records([], tmp_path / "e" / "x.parquet", "sft")
    (tmp_path / "e" / "y.jsonl").write_text("")
    with pytest.raises(EmptyInput, match="every shard is empty"):
        read_dataset(str(tmp_path / "e"), "sft")
    assert full


def test_verifiable_problem_without_reference_fails_alone():
    """Was: math_accuracy raised for the problem without a reference, failing every problem (rollout) or
    trajectory (labelling) of its task in the batch."""
    from fakes import FakePolicy

    from pipeline.labeling.job import label_batch
    from pipeline.rollout.trajectories import rollout_batch

    probs = [{"id": f"p{i}", "task": "math_word", "prompt": [{"role": "user", "content": f"Q{i}? answer=42"}],
              "reference": ref, "meta": "{}", "_shard": "s0"} for i, ref in enumerate(["42", None, "42", ""])]
    out = rollout_batch(FakePolicy(), pa.Table.from_pylist(probs), n_samples=1, sampling={}, policy="fake").to_pylist()
    errors = {r["_input"]: r["_error"] for r in out if r["_error"]}
    assert sorted(errors) == ["p1", "p3"] and "field 'reference': missing" in errors["p1"]
    assert sorted(r["_input"] for r in out if not r["_error"]) == ["p0", "p2"]

    trajs = [{"id": f"t{i}", "problem_id": f"p{i}", "prompt": p["prompt"], "steps": ["x", "\\boxed{42}"], "final": "",
              "outcome": None, "policy": "fake", "turns": None, "_shard": "s0"} for i, p in enumerate(probs)]
    out = label_batch(None, pa.Table.from_pylist(trajs), problems={p["id"]: p for p in probs},
                      objectives={"math_word": ["accuracy"]}, extra={}, methods={"math_word/accuracy": "outcome"},
                      mc={}, sampling={}).to_pylist()
    errors = {r["_input"]: r["_error"] for r in out if r["_error"]}
    assert sorted(errors) == ["t1", "t3"] and "math_word/accuracy is verified against it" in errors["t1"]
    assert [r["labels"] for r in out if not r["_error"]] == [[None, 1.0], [None, 1.0]]


def test_ray_data_reader_follows_the_same_contract(tmp_path, ray_session):
    """read_dataset (one task per shard): gzip shards, a save_to_disk folder in a shard directory, and
    same-named shards quarantining into their own files."""
    import datasets

    d = tmp_path / "shards"
    d.mkdir()
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps(sft(0)) + "\n")
    datasets.Dataset.from_list([sft(1)]).save_to_disk(str(d / "saved"))
    jsonl(d / "b" / "part.jsonl", [sft(2), sft(3, completion=3)])
    jsonl(d / "c" / "part.jsonl", [sft(4), sft(5, completion=5)])
    q = tmp_path / "q"
    ds = read_dataset(str(d), "sft", skip_bad_rows=True, quarantine_dir=str(q))
    assert sorted(r["id"] for r in ds.iter_rows()) == ["f0", "f1", "f2", "f4"]
    assert quarantine_count(str(q)) == 2
