"""Episode loading: a valid file round-trips; every kind of bad line is reported with its file and line."""
import json

import pytest

from memrl.episodes import REWARD_KINDS, Episode, EpisodeFormatError, load_episodes, validate_record, write_episodes
from memrl.errors import DataError


def _ep(i=0, **kw):
    d = {"id": f"ep-{i}", "question": "How much?", "shards": ["Ann has 3 pens.", "Each costs 2 dollars."],
         "answer": "6", "metadata": {"source": "test"}}
    d.update(kw)
    return d


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_round_trip(tmp_path):
    eps = [Episode("a", "q?", ["s1", "s2", "noise"], "42", {"noise_positions": [2], "answers": ["42", "forty-two"]}),
           Episode("b", "q2?", ["only"], "\\frac{1}{2}")]
    path = write_episodes(tmp_path / "eps.jsonl", eps)
    loaded = load_episodes(path)
    assert loaded == eps
    assert loaded[0].noise_positions == [2] and loaded[1].noise_positions == []
    assert loaded[0].references == ["42", "forty-two"] and loaded[1].references == ["\\frac{1}{2}"]
    assert loaded[0].problem == "s1 s2 q?"  # noise left out of the single-turn problem


def test_blank_lines_skipped(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(_ep(0)) + "\n\n   \n" + json.dumps(_ep(1)) + "\n")
    assert [e.id for e in load_episodes(path)] == ["ep-0", "ep-1"]


def test_every_problem_reported_by_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [
        _ep(0),                                            # 1 ok
        '{"id": "x", "question": ',                        # 2 malformed JSON
        {k: v for k, v in _ep(2).items() if k != "answer"},  # 3 missing answer
        _ep(3, question="   "),                            # 4 empty question
        _ep(4, shards="one shard"),                        # 5 wrong type
        _ep(5, shards=[]),                                 # 6 empty shards
        _ep(6, shards=["ok", ""]),                         # 7 empty shard
        _ep(7, answer=5),                                  # 8 wrong type
        _ep(8, shards=["s"] * 4),                          # 9 too many shards (max 3)
        _ep(9, shards=["x" * 50]),                         # 10 shard too long (max 30 tokens)
        _ep(0),                                            # 11 duplicate id
        _ep(11, metadata={"noise_positions": [0, 5]}),     # 12 noise position out of range
        _ep(12, metadata=[1]),                             # 13 metadata not an object
        _ep(13, shard=["typo"]),                           # 14 unknown field
        "[1, 2]",                                          # 15 not an object
    ])
    with pytest.raises(EpisodeFormatError) as exc:
        load_episodes(path, max_shards=3, max_shard_tokens=30, count_tokens=len)
    msg = "\n".join([str(exc.value)] + exc.value.details)
    assert str(exc.value).startswith(f"{path}:2: malformed JSON") and "(14 problem(s) in this file" in str(exc.value)
    expected = {
        2: "malformed JSON", 3: "field 'answer': missing", 4: "field 'question': empty",
        5: "field 'shards': expected a list of strings, got str", 6: "field 'shards': empty list",
        7: "field 'shards[1]': empty", 8: "field 'answer': expected a string, got int",
        9: "field 'shards': 4 shards > max_shards=3", 10: "field 'shards[0]': 50 tokens > max_shard_tokens=30",
        11: "field 'id': duplicate 'ep-0' (first on line 1)",
        12: "field 'metadata.noise_positions': [0, 5] out of range", 13: "field 'metadata': expected an object",
        14: "field 'shard': unknown top-level field", 15: "expected a JSON object"}
    for line, what in expected.items():
        assert f"{path}:{line}: {what}" in msg, (line, what, msg)
    assert f"{path}:1:" not in msg
    assert len(exc.value.problems) == len(expected)


def test_max_errors_caps_the_report(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ["{"] * 30)
    with pytest.raises(EpisodeFormatError, match=r"30 problem\(s\)") as exc:
        load_episodes(path, max_errors=20)
    assert len(exc.value.problems) == 20 and exc.value.details[-1] == "... and 10 more"


def test_limits_need_a_token_counter_and_files_must_exist(tmp_path):
    with pytest.raises(ValueError, match="count_tokens"):
        load_episodes(_write(tmp_path / "e.jsonl", [_ep()]), max_shard_tokens=10)
    with pytest.raises(DataError, match="missing.jsonl: no such episode file"):
        load_episodes(tmp_path / "missing.jsonl")
    with pytest.raises(EpisodeFormatError, match="empty"):
        load_episodes(_write(tmp_path / "empty.jsonl", [""]))


def test_metadata_keys_checked():
    assert validate_record(_ep(metadata={"answers": []})) == ["field 'metadata.answers': expected a non-empty list "
                                                               "of non-empty strings"]
    assert "duplicates" in validate_record(_ep(metadata={"noise_positions": [1, 1]}))[0]
    assert validate_record(_ep(metadata={"reward_kind": "code"}))
    assert validate_record(_ep(metadata={"noise_positions": [1], "whatever": {"x": 1}})) == []  # unknown: kept


def test_data_tools_writer_is_accepted(tmp_path):
    schema = pytest.importorskip("data_tools.schema")
    ep = _ep(0, metadata={"noise_positions": [1], "variant": "mixed", "problem": "Ann has 3 pens. How much?"})
    schema.validate_episode(ep)  # the writer's own check
    assert load_episodes(_write(tmp_path / "dt.jsonl", [ep]))[0].metadata["variant"] == "mixed"


def test_one_schema_for_writer_and_reader():
    """data_tools' writer check is this module's rules: same verdicts, same field named, path:line prefixed."""
    from memrl import reward

    schema = pytest.importorskip("data_tools.schema")
    assert schema.REWARD_KINDS is REWARD_KINDS  # one list: the writer, the reader and the reward share it
    for kind in REWARD_KINDS:  # each kind the schema accepts is one the reward grades
        assert reward.score("\\boxed{18}", "#### 18" if kind == "gsm8k" else "18", kind) == 1.0
    with pytest.raises(ValueError, match="unknown reward kind"):
        reward.score("18", "18", "code")
    bad = [_ep(shards=["ok", ""]), _ep(answer=5), _ep(metadata={"reward_kind": "code"}), {"id": "x"},
           _ep(metadata={"noise_positions": [True]}), _ep(extra=1)]
    for obj in bad:
        (first, *_) = validate_record(obj)
        with pytest.raises(schema.DataError) as exc:
            schema.validate_episode(obj, "f.jsonl", 7)
        assert str(exc.value).startswith(f"f.jsonl:7: {first}")
    assert schema.validate_episode(_ep()) == _ep()


def test_a_byte_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    second = json.dumps(_ep(1)).replace("Ann", "Ren\u00e9e")
    path.write_bytes(json.dumps(_ep(0)).encode() + b"\n" + second.encode("latin-1") + b"\n")
    with pytest.raises(EpisodeFormatError) as exc:
        load_episodes(path)
    assert str(exc.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at column {second.index('Ren') + 4})"
