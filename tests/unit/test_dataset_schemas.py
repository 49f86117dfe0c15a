"""Input schemas: detection from a record's keys, normalization, field errors, column maps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.dataset import core, formats, schemas
from services.dataset.schemas import normalize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "datasets"


def ok(record: dict, schema: str | None = None, column_map: dict | None = None) -> dict:
    row, errors = normalize(record, schema, column_map)
    assert errors == [], errors
    return row


def errors(record: dict, schema: str | None = None, column_map: dict | None = None) -> list[str]:
    row, errs = normalize(record, schema, column_map)
    assert row is None
    return errs


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# -- registry and detection ---------------------------------------------------------------------


def test_each_schema_normalizes_to_one_of_the_trainer_formats():
    assert schemas.NORMALIZED_FORMAT == {
        "openai_chat": "messages",
        "sharegpt": "messages",
        "preference": "preference",
        "alpaca": "prompt_completion",
        "prompt_completion": "prompt_completion",
        "text": "text",
    }
    assert set(schemas.NORMALIZED_FORMAT.values()) == set(core.FORMATS)


@pytest.mark.parametrize(
    ("keys", "schema"),
    [
        (["messages"], "openai_chat"),
        (["conversations"], "sharegpt"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen"], "preference"),
        (["instruction", "input", "output"], "alpaca"),
        (["output"], "alpaca"),
        (["prompt", "completion"], "prompt_completion"),
        (["prompt"], "prompt_completion"),
        (["text"], "text"),
        (["instruction", "output", "text"], "alpaca"),  # a rendered 'text' column beside them
        (["input"], None),
        ([], None),
    ],
)
def test_detect_schema_from_the_keys(keys, schema):
    assert schemas.detect_schema(dict.fromkeys(keys, "x")) == schema


# -- each schema --------------------------------------------------------------------------------


def test_prompt_completion_and_text_drop_other_fields():
    assert ok({"completion": " b", "id": 7, "prompt": "a"}) == {"prompt": "a", "completion": " b"}
    assert ok({"text": "t", "source": "web"}) == {"text": "t"}


@pytest.mark.parametrize(
    ("context", "prompt"),
    [
        (None, "Reverse."),
        ("", "Reverse."),
        ("  \n", "Reverse."),  # blank input adds nothing
        ("cat", "Reverse.\n\ncat"),
        (" cat\n", "Reverse.\n\n cat\n"),  # non-blank input is kept as written
    ],
)
def test_alpaca_joins_instruction_and_input(context, prompt):
    record = {"instruction": "Reverse.", "input": context, "output": "tac"}
    assert ok(record) == {"prompt": prompt, "completion": "tac"}
    assert ok({k: v for k, v in record.items() if v is not None}) == ok(record)


def test_alpaca_errors_name_each_field():
    assert errors({"instruction": 3, "input": ["x"], "output": ""}) == [
        "field 'instruction': must be a string, got number",
        "field 'input': must be a string, got array",
        "field 'output': must not be empty",
    ]
    assert errors({"instruction": "a"}) == ["field 'output': missing"]


def test_the_missing_field_fixture_names_its_line_and_field():
    path = FIXTURES / "bad" / "missing_field.jsonl"
    found = [
        (location, normalize(record)[1])
        for location, record in formats.read_records(
            path, path.name, "jsonl", max_line_bytes=1 << 20
        )
    ]
    assert [(loc, errs) for loc, errs in found if errs] == [
        ("missing_field.jsonl:2", ["field 'output': missing"])
    ]


def test_openai_chat_keeps_role_and_content_of_multi_turn_and_system_messages():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief.", "name": "sys"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 0},
            {"role": "user", "content": "Grüß dich"},
            {"role": "assistant", "content": "Servus ✓"},
        ]
    }
    assert ok(record) == {
        "messages": chat(
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Grüß dich"),
            ("assistant", "Servus ✓"),
        )
    }


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], ["field 'messages': must be a non-empty array of {role, content}"]),
        ({"role": "user"}, ["field 'messages': must be a non-empty array of {role, content}"]),
        (
            [{"role": "user", "content": "a"}, "b", {"role": "bot", "content": 5}],
            [
                "field 'messages[1]': must be an object, got string",
                "field 'messages[2].role': must be one of system, user, assistant",
                "field 'messages[2].content': must be a string, got number",
            ],
        ),
        (
            [{"content": "a"}, {"role": {"x": 1}}],
            [
                "field 'messages[0].role': missing",
                "field 'messages[1].role': must be one of system, user, assistant",
                "field 'messages[1].content': missing",
            ],
        ),
        (chat(("user", "a")), ["field 'messages': needs at least one assistant message"]),
        (
            chat(("user", "a"), ("assistant", "\ud800")),
            ["field 'messages[1].content': not valid Unicode text (lone surrogate)"],
        ),
    ],
)
def test_openai_chat_errors(messages, expected):
    assert errors({"messages": messages}) == expected


def test_a_conversation_given_as_json_text_is_decoded_as_csv_cells_hold_it():
    messages = chat(("user", "a"), ("assistant", "b"))
    assert ok({"messages": json.dumps(messages)}) == {"messages": messages}
    assert errors({"messages": "[{oops"}) == [
        "field 'messages': must be a non-empty array of {role, content}, got text that is not "
        "JSON (Expecting property name enclosed in double quotes, col 3)"
    ]


def test_text_fields_are_never_decoded_from_json():
    record = {"prompt": "Call it", "completion": '[{"name": "get_weather"}]'}
    assert ok(record) == record


def test_sharegpt_maps_its_role_names():
    record = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "h"},
            {"from": "gpt", "value": "g"},
            {"from": "user", "value": "u"},
            {"from": "assistant", "value": "a"},
        ]
    }
    assert ok(record) == {
        "messages": chat(
            ("system", "s"), ("user", "h"), ("assistant", "g"), ("user", "u"), ("assistant", "a")
        )
    }


def test_sharegpt_errors_use_its_field_names():
    record = {"conversations": [{"from": "bing", "value": "x"}, {"from": "human"}]}
    assert errors(record) == [
        "field 'conversations[0].from': must be one of human, user, gpt, assistant, system",
        "field 'conversations[1].value': missing",
    ]
    assert errors({"conversations": [{"from": "human", "value": "x"}]}) == [
        "field 'conversations': needs at least one assistant message"
    ]
    assert errors({"conversations": []}) == [
        "field 'conversations': must be a non-empty array of {from, value}"
    ]


def test_preference_rows_need_three_texts_and_two_different_replies():
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert ok({**row, "score": 3}) == row
    assert errors({**row, "rejected": "a"}) == ["field 'rejected': must differ from 'chosen'"]
    assert errors({"chosen": "a", "rejected": 1}) == [
        "field 'prompt': missing",
        "field 'rejected': must be a string, got number",
    ]


@pytest.mark.parametrize(
    "record",
    [
        {
            "prompt": chat(("user", "p")),
            "chosen": chat(("assistant", "a")),
            "rejected": chat(("assistant", "b")),
        },
        {
            "chosen": chat(("user", "p"), ("assistant", "a")),
            "rejected": chat(("user", "p"), ("assistant", "b")),
        },
        {"prompt": "p", "chosen": chat(("assistant", "a")), "rejected": "b"},
    ],
)
def test_preference_in_trls_conversational_forms(record):
    assert ok(record) == {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {
                "prompt": chat(("system", "s"), ("user", "p")),
                "chosen": chat(("assistant", "a")),
                "rejected": chat(("assistant", "b")),
            },
            "field 'prompt': the conversation before the chosen and rejected replies must be one "
            "user message, got system, user; a preference row holds one prompt text",
        ),
        (
            {"chosen": chat(("assistant", "a")), "rejected": chat(("assistant", "b"))},
            "field 'chosen': the conversation before the chosen and rejected replies must be one "
            "user message, got none; a preference row holds one prompt text",
        ),
        (
            {
                "chosen": chat(("user", "p"), ("assistant", "a")),
                "rejected": chat(("user", "q"), ("assistant", "b")),
            },
            "field 'rejected': must share the conversation before its last message with 'chosen'",
        ),
        (
            {"prompt": "p", "chosen": chat(("assistant", "a")), "rejected": chat(("user", "b"))},
            "field 'rejected': must end with an assistant message",
        ),
        (
            {
                "prompt": "p",
                "chosen": chat(("assistant", "a")),
                "rejected": chat(("assistant", "a")),
            },
            "field 'rejected': must differ from 'chosen'",
        ),
        (
            {"prompt": "p", "chosen": [], "rejected": "b"},
            "field 'chosen': must be a non-empty array of {role, content}",
        ),
    ],
)
def test_preference_conversations_that_do_not_fit_one_prompt_are_refused(record, expected):
    assert errors(record) == [expected]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("", "field 'text': must not be empty"),
        (" \n\t", "field 'text': must not be empty"),
        (None, "field 'text': must be a string, got null"),
        (True, "field 'text': must be a string, got boolean"),
        (1.5, "field 'text': must be a string, got number"),
        ({"a": 1}, "field 'text': must be a string, got object"),
        (b"raw", "field 'text': must be a string, got bytes"),  # a Parquet binary column
        ("ok\udcff", "field 'text': not valid Unicode text (lone surrogate)"),
    ],
)
def test_text_values_must_be_non_blank_valid_strings(value, error):
    assert errors({"text": value}) == [error]


# -- mixing, explicit schemas and column maps ---------------------------------------------------


@pytest.mark.parametrize(
    ("record", "error"),
    [
        (
            {"messages": chat(("user", "a"), ("assistant", "b")), "prompt": "a"},
            "row mixes 'messages' with 'prompt': use one schema, or name the one to read",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c"},
            "row mixes 'chosen'/'rejected' with 'completion': "
            "use one schema, or name the one to read",
        ),
        (
            {"instruction": "i", "output": "o", "prompt": "p", "completion": "c"},
            "row mixes 'instruction'/'output' with 'prompt'/'completion': "
            "use one schema, or name the one to read",
        ),
    ],
)
def test_a_detected_row_must_not_mix_schemas(record, error):
    assert errors(record) == [error]


def test_a_named_schema_reads_its_fields_and_ignores_the_rest():
    # as ultrachat_200k rows are: a prompt beside the conversation
    messages = chat(("user", "a"), ("assistant", "b"))
    record = {"prompt": "a", "prompt_id": "1", "messages": messages}
    assert ok(record, "openai_chat") == {"messages": messages}
    assert errors({"prompt": "a"}, "openai_chat") == ["field 'messages': missing"]


def test_a_row_of_no_schema_lists_what_each_needs():
    assert errors({"question": "q", "answer": "a"}) == [
        "row must have the fields of one schema: openai_chat (messages), sharegpt "
        "(conversations), preference (prompt, chosen, rejected), alpaca (instruction, output), "
        "prompt_completion (prompt, completion), text (text); got keys ['answer', 'question']"
    ]


def test_a_column_map_renames_the_users_columns_with_or_without_a_named_schema():
    record = {"question": "q", "answer": "a", "prompt": "ignored"}
    column_map = {"prompt": "question", "completion": "answer"}
    assert ok(record, "prompt_completion", column_map) == {"prompt": "q", "completion": "a"}
    assert ok(record, None, column_map) == {"prompt": "q", "completion": "a"}
    dialog = {"dialog": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert ok(dialog, "openai_chat", {"messages": "dialog"}) == {"messages": dialog["dialog"]}


def test_errors_on_a_mapped_field_name_the_users_column():
    column_map = {"prompt": "question", "completion": "answer"}
    assert errors({"answer": "a", "prompt": "not this one"}, "prompt_completion", column_map) == [
        "field 'prompt' (column 'question'): missing"
    ]
    dialog = {"dialog": [{"role": "user", "content": 1}]}
    assert errors(dialog, "openai_chat", {"messages": "dialog"}) == [
        "field 'messages[0].content' (column 'dialog'): must be a string, got number"
    ]


def test_unknown_schemas_and_column_map_fields_are_refused():
    with pytest.raises(
        ValueError,
        match="unknown schema 'chatml'; known schemas: "
        "openai_chat, sharegpt, preference, alpaca, prompt_completion, text",
    ):
        normalize({"text": "t"}, "chatml")
    with pytest.raises(
        ValueError, match="names field\\(s\\) answer that schema prompt_completion does not read"
    ):
        schemas.check_options("prompt_completion", {"answer": "a"})
    with pytest.raises(ValueError, match="that any schema does not read"):
        normalize({"text": "t"}, None, {"question": "q"})
    with pytest.raises(ValueError, match="non-empty column name"):
        schemas.check_options("text", {"text": ""})


def test_a_dataset_name_is_one_subject_token():
    from services.dataset.core import name_error

    assert name_error("support-v1_2") is None
    for bad in ("support.v1", "a b", "../etc", "x" * 65, "*", "data>"):
        assert name_error(bad).startswith("name: must match"), bad
