"""Trace loaders on the shipped real traces (known values from experiments/data/README.md and
the trace publishers) and on broken files (errors name file, line and field)."""

import json
import pathlib

import numpy as np
import pytest

from symphony_jax.workloads import traces as T
from symphony_jax.workloads.traces import TraceFormatError, TraceRequests

DATA = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "data"
MOONCAKE = DATA / "mooncake" / "conversation_trace.jsonl"
SESSIONS = DATA / "mooncake" / "conversation_trace_sessions_reconstructed.csv"


def test_mooncake_conversation_trace():
    trace = T.load_mooncake(MOONCAKE)
    assert len(trace) == 12_031
    assert round(trace.input_tokens.mean()) == 12_035  # the publisher's README
    assert round(trace.output_tokens.mean()) == 343
    assert trace.timestamp_s.max() == pytest.approx(3536.999)
    assert len(np.unique(trace.timestamp_s)) == 1_180
    assert np.percentile(trace.input_tokens, 50) == 6_909
    assert (trace.input_tokens[0], trace.output_tokens[0]) == (6758, 500)
    ids, offsets = trace.columns["hash_ids"], trace.columns["hash_offsets"]
    assert ids[offsets[0]:offsets[1]].tolist() == list(range(14))
    assert np.array_equal(np.diff(offsets), -(-trace.input_tokens // 512))
    assert (trace.session == -1).all()
    workload = T.to_workload(trace)
    assert workload.num_sessions == 12_031 and workload.turns_per_session.max() == 1


def test_mooncake_synthetic_trace():
    trace = T.load_mooncake(DATA / "mooncake" / "synthetic_trace.jsonl")
    assert len(trace) == 3_993
    assert round(trace.input_tokens.mean()) == 15_325
    assert round(trace.output_tokens.mean()) == 149
    assert round(trace.timestamp_s.max()) == 1_022


def test_mooncake_reconstructed_sessions():
    trace = T.load_mooncake_sessions(SESSIONS)
    assert len(trace) == 12_031 and trace.num_sessions == 8_340
    turn, parent = trace.columns["turn"], trace.columns["parent_row"]
    assert np.bincount(turn)[1:9].tolist() == [8_340, 2_002, 750, 355, 185, 110, 69, 48]
    assert np.sum(parent >= 0) == 3_691
    assert np.sum(np.bincount(parent[parent >= 0]) > 1) == 55  # branching parents
    gaps = trace.columns["gap_from_parent_s"]
    gaps = gaps[~np.isnan(gaps)]
    assert np.percentile(gaps, 50) == pytest.approx(129, abs=0.5)
    assert gaps.mean() == pytest.approx(223, abs=0.5)
    counts = T.turns_per_session(trace)
    assert np.sum(counts > 1) == 1_967 and counts.max() == 25
    # the conversation trace and its reconstruction describe the same requests
    raw = T.load_mooncake(MOONCAKE)
    assert np.array_equal(raw.input_tokens, trace.input_tokens)
    assert np.allclose(raw.timestamp_s, trace.timestamp_s)
    workload = T.to_workload(trace)
    assert workload.num_turns == 12_031 and workload.num_sessions == 8_340
    rows = np.arange(len(trace))
    recorded = trace.input_tokens[np.lexsort((rows, trace.timestamp_s, trace.session))]
    assert np.all(workload.prompt_tokens >= recorded)
    first = workload.turn_index == 0
    assert np.array_equal(workload.prompt_tokens[first], recorded[first])
    clamped = T.clamped_follow_ups(trace)
    assert 0 < clamped < 0.15 * 3_691


def test_ragpulse():
    trace = T.load_ragpulse(DATA / "ragpulse" / "0_trace.jsonl")
    assert len(trace) == 7_106 and trace.num_sessions == 3_990
    counts = T.turns_per_session(trace)
    assert (counts > 1).mean() == pytest.approx(0.412, abs=0.0005)
    assert counts.mean() == pytest.approx(1.78, abs=0.005) and counts.max() == 25
    gaps = T.inter_turn_gaps(trace)
    assert len(gaps) == 3_116 and np.percentile(gaps, 50) == 40
    assert round(gaps.mean()) == 1_912
    assert trace.timestamp_s.max() == 604_603  # 7.00 days
    assert np.sum(np.diff(trace.timestamp_s) < 0) == 1  # the one inversion
    assert round(trace.input_tokens.mean()) == 2_944 and round(trace.output_tokens.mean()) == 283
    assert trace.session_keys[trace.session[0]] == "1757476916095-afhwfadnh5ew"
    assert (trace.timestamp_s[0], trace.input_tokens[0], trace.output_tokens[0]) == (82, 3112, 192)
    workload = T.to_workload(trace)
    assert workload.num_turns == 7_106 and workload.arrival_s.min() == 0
    assert np.array_equal(workload.turns_per_session, counts)


@pytest.mark.parametrize("name, rows, duration, context, generated", [
    ("conv", 19_366, 3_502, 1_155, 211), ("code", 8_819, 3_436, 2_048, 28)])
def test_azure(name, rows, duration, context, generated):
    trace = T.load_azure(DATA / "azure_llm_2023" / f"AzureLLMInferenceTrace_{name}.csv")
    assert len(trace) == rows
    assert round(trace.timestamp_s.max()) == duration
    assert round(trace.input_tokens.mean()) == context
    assert round(trace.output_tokens.mean()) == generated
    assert trace.timestamp_s.min() == 0
    if name == "conv":
        assert trace.timestamp_s[1] == pytest.approx(4.314579)  # 18:15:50.9951690 - 46.6805900
        assert str(trace.columns["start"][0]) == "2023-11-16T18:15:46.680590000"


def test_to_workload_by_hand():
    trace = TraceRequests(
        "t", line=np.arange(1, 6), timestamp_s=np.array([10.0, 5.0, 30.0, 20.0, 7.0]),
        input_tokens=np.array([250, 100, 200, 400, 9]), output_tokens=np.array([60, 50, 7, 8, 1]),
        session=np.array([0, 0, 0, 1, -1]), session_keys=("a", "b"))
    w = T.to_workload(trace)
    # session 0 in time order: 100 (+50 out) -> 250 (100 new, +60 out) -> 200 (< history)
    assert w.session_id.tolist() == [0, 0, 0, 1, 6]
    assert w.input_tokens.tolist() == [100, 100, 1, 400, 9]
    assert w.prompt_tokens.tolist() == [100, 250, 311, 400, 9]
    assert w.arrival_s.tolist() == [0.0, 5.0, 25.0, 15.0, 2.0]
    assert T.clamped_follow_ups(trace) == 1
    failed = TraceRequests("t.csv", np.array([2, 3]), np.zeros(2), np.array([5, 5]),
                           np.array([3, 0]), np.array([-1, -1]))
    with pytest.raises(ValueError, match=r"t.csv:3: .*output_tokens=0.*drop_failed"):
        T.to_workload(failed)
    assert T.to_workload(failed, drop_failed=True).num_turns == 1


# ---------------------------------------------------------------- broken files


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_MOONCAKE = '{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}\n'


@pytest.mark.parametrize("text, line, field", [
    (GOOD_MOONCAKE + '{"timestamp": 3, "input_length": 6', 2, "<record>"),  # truncated
    (GOOD_MOONCAKE + '{"timestamp": 3, "input_length": "6", "output_length": 1, '
                     '"hash_ids": [1]}\n', 2, "input_length"),  # mistyped
    (GOOD_MOONCAKE + '{"timestamp": 3, "output_length": 1, "hash_ids": [1]}\n', 2,
     "input_length"),  # missing
    ('\n' + GOOD_MOONCAKE + '{"timestamp": -1, "input_length": 6, "output_length": 1, '
                            '"hash_ids": [1]}\n', 3, "timestamp"),  # negative, after a blank
    (GOOD_MOONCAKE.replace("[1, 2]", "[1]"), 1, "hash_ids"),  # wrong block count
    (GOOD_MOONCAKE.replace("[1, 2]", "[1, true]"), 1, "hash_ids"),
    ("[1, 2]\n", 1, "<record>"),
    ("", 1, "<record>"),
])
def test_mooncake_errors_name_file_line_and_field(tmp_path, text, line, field):
    path = write(tmp_path, "trace.jsonl", text)
    with pytest.raises(TraceFormatError) as error:
        T.load_mooncake(path)
    assert (error.value.path, error.value.line, error.value.field) == (str(path), line, field)
    assert str(error.value).startswith(f"{path}:{line}: field {field!r}: expected")


def test_ragpulse_errors(tmp_path):
    good = json.loads((DATA / "ragpulse" / "0_trace.jsonl").open().readline())
    cases = [("timestamp", "soon", "timestamp"), ("session_id", "", "session_id"),
             ("hash_ids", {"sys_prompt": []}, "hash_ids.passages_ids"),
             ("output_length", 2.5, "output_length")]
    for key, value, field in cases:
        record = dict(good, **{key: value})
        path = write(tmp_path, "r.jsonl", json.dumps(good) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(TraceFormatError) as error:
            T.load_ragpulse(path)
        assert (error.value.line, error.value.field) == (2, field)


@pytest.mark.parametrize("text, line, field", [
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.1,3\n", 1, "GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3,4\n"
     "2023-11-16 18:15:47,3\n", 3, "<row>"),  # truncated row
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3,4\n"
     "2023-11-16 25:15:47,3,4\n", 3, "TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16,3,4\n", 2, "TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,3.5,4\n", 2,
     "ContextTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", 2, "<row>"),
])
def test_azure_errors(tmp_path, text, line, field):
    with pytest.raises(TraceFormatError) as error:
        T.load_azure(write(tmp_path, "a.csv", text))
    assert (error.value.line, error.value.field) == (line, field)


def test_mooncake_sessions_errors(tmp_path):
    lines = SESSIONS.read_text().splitlines()[:40]
    cases = [(3, lambda c: c[:6] + ["-1"] + c[7:], "turn"),  # turn 0 < 1
             (5, lambda c: c[:7] + ["2"] + c[8:], "parent_idx"),  # first turn with a parent
             (4, lambda c: ["7"] + c[1:], "req_idx"),
             (6, lambda c: c[:8] + ["12"], "gap_from_parent_s")]
    for line, edit, field in cases:
        broken = list(lines)
        broken[line - 1] = ",".join(edit(broken[line - 1].split(",")))
        with pytest.raises(TraceFormatError) as error:
            T.load_mooncake_sessions(write(tmp_path, "s.csv", "\n".join(broken) + "\n"))
        assert (error.value.line, error.value.field) == (line, field)


BURST_V1 = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5.0,ChatGPT,472,18,490,Conversation log
45.0,GPT-4,1087,0,1087,API log
118.0,ChatGPT,417,276,693,Conversation log
"""

BURST_V3 = ("Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,"
            "Total tokens,Log Type\n") + """19440110.0,1722ac82-aaaa,43,GPT-4,906,446,1352,Conversation log
19440111.0,,2.5,ChatGPT,36,10,46,API log
19440200.0,1722ac82-aaaa,20,GPT-4,1400,300,1700,Conversation log
19440300.0,99ffee00-bbbb,,ChatGPT,50,0,50,Conversation log
"""


def test_burstgpt_both_layouts(tmp_path):
    v1 = T.load_burstgpt(write(tmp_path, "BurstGPT_1.csv", BURST_V1))
    assert len(v1) == 3 and v1.num_sessions == 0 and (v1.session == -1).all()
    assert v1.columns["model"].tolist() == ["ChatGPT", "GPT-4", "ChatGPT"]
    assert np.isnan(v1.columns["elapsed_s"]).all()
    assert v1.output_tokens.tolist() == [18, 0, 276]
    v3 = T.load_burstgpt(write(tmp_path, "BurstGPT_3.csv", BURST_V3))
    assert v3.session.tolist() == [0, -1, 0, 1]
    assert v3.session_keys == ("1722ac82-aaaa", "99ffee00-bbbb")
    assert v3.columns["elapsed_s"][:3].tolist() == [43.0, 2.5, 20.0]
    assert np.isnan(v3.columns["elapsed_s"][3])
    with pytest.raises(ValueError, match=r"BurstGPT_3.csv:5: .*output_tokens=0"):
        T.to_workload(v3)
    w = T.to_workload(v3, drop_failed=True)
    assert w.session_id.tolist() == [0, 0, 3]  # session 0's two turns, the API row alone
    assert w.input_tokens.tolist() == [906, 48, 36]  # 1400 - (906 + 446)
    assert w.arrival_s.tolist() == [0.0, 90.0, 1.0]


@pytest.mark.parametrize("edit, line, field", [
    (lambda t: t.replace("API log", "Web log"), 3, "Log Type"),
    (lambda t: t.replace(",472,", ",many,"), 2, "Request tokens"),
    (lambda t: t.replace("Total tokens,", ""), 1, "Total tokens"),
    (lambda t: t.replace("118.0,", "-118.0,"), 4, "Timestamp"),
    (lambda t: t.replace(",693,", ",694,"), 4, "Total tokens"),  # not request + response
])
def test_burstgpt_errors(tmp_path, edit, line, field):
    with pytest.raises(TraceFormatError) as error:
        T.load_burstgpt(write(tmp_path, "b.csv", edit(BURST_V1)))
    assert (error.value.line, error.value.field) == (line, field)


SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hello there"},
        {"from": "gpt", "value": "Hi!"},
        {"from": "human", "value": "Tell me"},
        {"from": "human", "value": "more"},
        {"from": "gpt", "value": "Sure, here is more text."},
        {"from": "human", "value": "unanswered"}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "I start"}]},
    {"id": "c", "conversations": [{"from": "gpt", "value": "x"}, {"from": "user", "value": "q"},
                                  {"from": "assistant", "value": "answer"}]},
]


def test_sharegpt(tmp_path):
    path = write(tmp_path, "sg.json", json.dumps(SHAREGPT, indent=1))
    w = T.load_sharegpt(path)
    assert w.session_id.tolist() == [0, 0, 2]  # conversation 1 has no complete turn
    assert w.text == ("Be brief.\nHello there", "Tell me\nmore", "q")
    assert w.input_tokens.tolist() == [6, 3, 1]  # ceil(chars / 4)
    assert w.output_tokens.tolist() == [1, 6, 2]
    assert w.arrival_s is None
    words = T.load_sharegpt(path, tokenize=lambda s: [len(x) for x in s.split()])
    assert words.input_tokens.tolist() == [4, 3, 1]
    assert words.token_ids[0] == (2, 6, 5, 5)


@pytest.mark.parametrize("document, line, field", [
    ('[{"conversations": [{"from": "human", "value": "q"}]},\n {"conversations": '
     '[{"from": "robot", "value": "x"}]}]', 2, "conversations[0].from"),
    ('[\n{"conversations": [{"from": "human", "value": 3}]}]', 2, "conversations[0].value"),
    ('[\n{"conversations": "none"}]', 2, "conversations"),
    ('[{"conversations": []},\n{"conversations": [}]', 2, "[1]"),  # truncated / invalid
    ('{"conversations": []}', 1, "<file>"),
    ('[{"conversations": []}\n {"conversations": []}]', 2, "[0]"),  # no ',' after [0]
    ('[\n ]', 2, "<file>"),  # empty, as a JSON-lines trace with no record is
    ('[{"conversations": [{"from": "human", "value": "q"}]}]', 1, "<file>"),  # no turn
])
def test_sharegpt_errors(tmp_path, document, line, field):
    with pytest.raises(TraceFormatError) as error:
        T.load_sharegpt(write(tmp_path, "sg.json", document))
    assert (error.value.line, error.value.field) == (line, field)
