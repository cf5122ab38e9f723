"""A user's own fine-tuning data: every layout on small files in tmp_path (JSON lines, a saved datasets
dataset, parquet), the errors, and the chat / plain formats with assistant-only labels checked token by
token (a byte tokenizer with a Jinja chat template: one token per byte, so positions are character
offsets; the real SmolLM2 template and HH files in the slow tests)."""
import json
import logging

import pytest

from conftest import make_byte_tokenizer
from trustrepair.data import (
    Conversation, DataError, SFTRecord, TrustRecord, format_trust, load_hh_sft, load_sft_jsonl, load_training_file,
    load_training_files, prompt_messages, resolve_format, tokenize_conversations, tokenize_sft, tokenize_trust,
    tokenize_trust_pairs,
)
from trustrepair.task import IGNORE_INDEX

# ChatML with the byte tokenizer's specials: "<s>" opens a turn, "</s>" (its EOS) closes it.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."}]
HH = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye now."


@pytest.fixture(scope="module")
def chat_tok():
    tok = make_byte_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ layouts

def test_chat_layout_keeps_every_turn_and_trains_every_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}])
    first, second = load_training_file(path)
    assert first.messages == tuple((m["role"], m["content"]) for m in CHAT)
    assert (first.source, first.context, first.text, first.trained_turns) == (f"{path}:1", 0, None, (2, 4))
    assert second.trained_turns == (1,) and second.source == f"{path}:2"


@pytest.mark.parametrize("key", ["completion", "response", "chosen"])
def test_prompt_completion_layouts_keep_the_verbatim_text_and_train_the_completion(tmp_path, key):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 2+2?\n\nAnswer:", key: " 4"}])
    (record,) = load_training_file(path)
    assert record.text == ("What is 2+2?\n\nAnswer:", " 4")
    assert record.messages == (("user", "What is 2+2?"), ("assistant", "4"))
    assert record.trained_turns == (1,)


def test_hh_dialogue_splits_after_the_last_assistant_cue_and_trains_only_that_turn(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH, "rejected": "ignored"}])
    (record,) = load_training_file(path)
    assert record.text == ("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:", " Bye now.")
    assert record.messages == (("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye now."))
    assert record.trained_turns == (3,)


def test_conversational_prompt_completion_trains_the_completion_turns_only(tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", [{"prompt": CHAT[:4], "completion": CHAT[4:]}])
    (record,) = load_training_file(path)
    assert record.context == 4 and record.trained_turns == (4,) and len(record.messages) == 5


def test_saved_dataset_and_parquet_give_the_jsonl_records_with_row_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "Q1\n\nAnswer:", "completion": " A1"}, {"prompt": "Q2\n\nAnswer:", "completion": " A2"}]
    expected = load_training_file(write_jsonl(tmp_path / "x.jsonl", rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    dataset.to_parquet(str(tmp_path / "x.parquet"))
    chat = datasets.Dataset.from_list([{"messages": CHAT}])
    chat.save_to_disk(str(tmp_path / "chat"))
    for path in (tmp_path / "saved", tmp_path / "x.parquet"):
        records = load_training_file(path)
        assert [(r.messages, r.text) for r in records] == [(r.messages, r.text) for r in expected]
        assert [r.source for r in records] == [f"{path}:row 0", f"{path}:row 1"]
    assert load_training_file(tmp_path / "chat")[0].trained_turns == (2, 4)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"splits \['train'\]; pass one split's folder"):
        load_training_file(tmp_path / "splits")


def test_several_files_concatenate_in_order_with_their_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT[1:3]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"chosen": HH}, {"prompt": "p", "response": " r"}])
    assert [r.source for r in load_training_files([b, a])] == [f"{b}:1", f"{b}:2", f"{a}:1"]
    assert [r.source for r in load_training_files(a)] == [f"{a}:1"]


def test_prompt_messages_reads_the_built_in_cues_and_hh_transcripts():
    assert prompt_messages("Tell me a fact about X\n\nAssistant:") == [("user", "Tell me a fact about X")]
    assert prompt_messages("Q?\n\nAnswer:") == [("user", "Q?")]
    assert prompt_messages("Sys.\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Bye\n\nAssistant:") == [
        ("system", "Sys."), ("user", "Hi"), ("assistant", "Yo"), ("user", "Bye")]


# ------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("row, message", [
    ({"text": "hello"}, r"bad\.jsonl:2: unknown layout \(fields \['text'\]\); accepted layouts: .*messages.*prompt"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, r"bad\.jsonl:2: no assistant turn to train on"),
    ({"messages": [{"role": "tool", "content": "x"}]}, r"bad\.jsonl:2: messages\[0\] has role 'tool'; accepted roles"),
    ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: messages\[0\] must be an object with 'role' and 'content'"),
    ({"messages": []}, r"bad\.jsonl:2: field 'messages' must be a non-empty list"),
    ({"prompt": 3, "completion": "x"}, r"bad\.jsonl:2: field 'prompt' must be a string, got int"),
    ({"chosen": "no cues here"}, r"bad\.jsonl:2: not an HH dialogue"),
    ({"prompt": CHAT[:4], "completion": [{"role": "user", "content": "x"}]}, r"bad\.jsonl:2: no assistant turn"),
])
def test_bad_rows_name_the_file_line_and_what_is_accepted(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CHAT}, row])
    with pytest.raises(DataError, match=message):
        load_training_file(path)


def test_empty_missing_and_blank_files(tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no training examples .*accepted layouts"):
        load_training_file(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_training_file(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no paths"):
        load_training_files([])
    path = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "p", "completion": " "}, {"chosen": HH}])
    with caplog.at_level(logging.WARNING):
        assert len(load_training_file(path)) == 1
    assert "skipped 1 examples with a blank completion" in caplog.text


# ---------------------------------------------------------------------------------------- chat format

def test_chat_labels_cover_assistant_content_and_end_of_turn_token_by_token(chat_tok):
    record = Conversation(tuple((m["role"], m["content"]) for m in CHAT), source="x:1")
    (ex,) = tokenize_conversations([record], chat_tok, 512)
    text = ("<s>system\nBe kind.</s>\n<s>user\nHi</s>\n<s>assistant\nHello!</s>\n"
            "<s>user\nBye</s>\n<s>assistant\nBye.</s>\n")
    assert ex["input_ids"].tolist() == ids_of(chat_tok, text)
    # hand computation: one token per byte and per special; the trained spans are "Hello!</s>" and "Bye.</s>"
    tokens = [chat_tok.convert_ids_to_tokens(i) for i in ex["input_ids"].tolist()]
    trained = "".join(t for t, label in zip(tokens, ex["labels"].tolist()) if label != IGNORE_INDEX)
    assert trained == "Hello!</s>Bye.</s>"
    first = len("<s>system\nBe kind.</s>\n<s>user\nHi</s>\n<s>assistant\n".replace("<s>", "S").replace("</s>", "E"))
    expected = [IGNORE_INDEX] * len(tokens)
    second = first + len("Hello!E\nSuser\nByeE\nSassistant\n")
    for start, n in ((first, len("Hello!E")), (second, len("Bye.E"))):
        expected[start:start + n] = ex["input_ids"][start:start + n].tolist()
    assert ex["labels"].tolist() == expected


def test_chat_context_turns_carry_no_loss_and_later_turns_are_dropped(chat_tok):
    record = Conversation(tuple((m["role"], m["content"]) for m in CHAT[1:]), context=2)
    (ex,) = tokenize_conversations([record], chat_tok, 512, format="chat")
    tokens = chat_tok.convert_ids_to_tokens(ex["input_ids"].tolist())
    assert "".join(t for t, label in zip(tokens, ex["labels"].tolist()) if label != IGNORE_INDEX) == "Bye.</s>"
    early = Conversation((("user", "Hi"), ("assistant", "Hello!"), ("user", "unused")))
    (ex,) = tokenize_conversations([early], chat_tok, 512)
    assert ex["input_ids"].tolist() == ids_of(chat_tok, "<s>user\nHi</s>\n<s>assistant\nHello!</s>\n")


def test_chat_left_truncation_keeps_the_end_and_rejects_an_example_left_without_loss(chat_tok):
    record = Conversation((("user", "Hi"), ("assistant", "Hello!")), source="t.jsonl:7")
    (full,) = tokenize_conversations([record], chat_tok, 512)
    (cut,) = tokenize_conversations([record], chat_tok, 9)
    assert cut["input_ids"].tolist() == full["input_ids"][-9:].tolist()
    assert cut["labels"].tolist() == full["labels"][-9:].tolist()
    with pytest.raises(DataError, match=r"t\.jsonl:7: no trainable token left after left-truncation"):
        tokenize_conversations([record], chat_tok, 1)  # only the template's "\n" after "</s>" would remain


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = make_byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    record = Conversation((("user", "Hi"), ("assistant", "Yo")), source="f:3")
    with pytest.raises(DataError, match=r"f:3: the chat template renders .* not a prefix .* use format 'plain'"):
        tokenize_conversations([record], tok, 64)


def test_format_resolution(chat_tok, byte_tokenizer):
    assert resolve_format(chat_tok) == "chat" and resolve_format(byte_tokenizer) == "plain"
    assert resolve_format(chat_tok, "plain") == "plain"
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        resolve_format(byte_tokenizer, "chat")
    with pytest.raises(ValueError, match=r"unknown format 'html'; choose from \['chat', 'plain'\]"):
        resolve_format(chat_tok, "html")


# --------------------------------------------------------------------------------------- plain format

def test_plain_text_layouts_are_exactly_tokenize_sft(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"chosen": HH}, {"prompt": "Q\n\nAnswer:", "completion": " A"}])
    records = load_training_file(path)
    sft = [SFTRecord(*r.text) for r in records]
    for kwargs in ({}, {"add_bos": True}, {"add_eos": False}, {"max_length": 12}):
        kwargs = {"max_length": 256, **kwargs}
        new = tokenize_conversations(records, byte_tokenizer, format="plain", **kwargs)
        old = tokenize_sft(sft, byte_tokenizer, **kwargs)
        assert [(e["input_ids"].tolist(), e["labels"].tolist()) for e in new] == \
               [(e["input_ids"].tolist(), e["labels"].tolist()) for e in old]


def test_plain_chat_layout_uses_hh_cues_with_every_assistant_turn_in_the_loss(byte_tokenizer):
    record = Conversation(tuple((m["role"], m["content"]) for m in CHAT))
    (ex,) = tokenize_conversations([record], byte_tokenizer, 256, format="plain")
    text = "Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: Bye."
    assert ex["input_ids"].tolist() == ids_of(byte_tokenizer, text) + [byte_tokenizer.eos_token_id]
    ids = ex["input_ids"].tolist()
    expected = [IGNORE_INDEX] * len(ids)  # one token per byte: character offsets are token positions
    for start, end in ((text.index(" Hello!"), text.index("\n\nHuman: Bye")), (text.index(" Bye."), len(ids))):
        expected[start:end] = ids[start:end]
    assert ex["labels"].tolist() == expected


# ---------------------------------------------------------------------------------------- trust pairs

def test_trust_pairs_in_chat_format_share_the_rendered_prompt_without_cue_or_leading_space(chat_tok):
    records = [TrustRecord("Is the earth flat?\n\nAnswer:", " No.", " Yes.", source="t:1")]
    (formatted,) = format_trust(records, chat_tok)
    assert (formatted.prompt, formatted.proponent, formatted.opponent) == (
        "<s>user\nIs the earth flat?</s>\n<s>assistant\n", "No.", "Yes.")
    (query,) = tokenize_trust_pairs(records, chat_tok, 64)
    prompt = ids_of(chat_tok, formatted.prompt)
    for side, text in (("proponent", "No."), ("opponent", "Yes.")):
        assert query[side]["input_ids"].tolist() == prompt + ids_of(chat_tok, text)  # no end-of-turn token
        assert query[side]["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + ids_of(chat_tok, text)
    plain = tokenize_trust_pairs(records, chat_tok, 64, format="plain", add_bos=True)
    assert plain[0]["opponent"]["input_ids"].tolist() == \
           tokenize_trust(records, chat_tok, 64, add_bos=True)[0]["opponent"]["input_ids"].tolist()


# ------------------------------------------------------------------------------ real template and data

@pytest.mark.slow
def test_smollm2_chat_template_trains_content_and_im_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    record = Conversation((("user", "Hi there"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye.")))
    (ex,) = tokenize_conversations([record], tok, 512)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    whole = tok.apply_chat_template([{"role": r, "content": c} for r, c in record.messages], tokenize=False)
    assert ids == ids_of(tok, whole)
    expected = [IGNORE_INDEX] * len(ids)
    for turn in (1, 3):  # hand computation: after the prefix with the generation prompt, content + <|im_end|>
        before = tok.apply_chat_template([{"role": r, "content": c} for r, c in record.messages[:turn]],
                                         tokenize=False, add_generation_prompt=True)
        span = ids_of(tok, record.messages[turn][1]) + [tok.convert_tokens_to_ids("<|im_end|>")]
        start = len(ids_of(tok, before))
        assert ids[start:start + len(span)] == span
        expected[start:start + len(span)] = span
    assert labels == expected
    assert tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == "Hello!<|im_end|>Bye.<|im_end|>"
    (query,) = tokenize_trust_pairs([TrustRecord("Q?\n\nAnswer:", " Yes", " No")], tok, 64)
    assert tok.decode(query["proponent"]["input_ids"]).endswith("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nYes")


@pytest.mark.slow
def test_plain_format_reproduces_the_demo_tokens_on_the_hh_files(shared_data, smollm2_tokenizer):
    demo = load_hh_sft(shared_data, max_examples=300)
    records = load_training_file(shared_data / "hh_rlhf/harmless-base_test_static.jsonl.gz")
    by_source = {r.source: r for r in records}
    mine = [by_source[r.source] for r in demo.records]
    new = tokenize_conversations(mine, smollm2_tokenizer, 256, format="plain")
    old = demo.tokenize(smollm2_tokenizer, 256)
    assert len(new) == len(old) == 300
    assert all(a["input_ids"].equal(b["input_ids"]) and a["labels"].equal(b["labels"]) for a, b in zip(new, old))
    raw = shared_data / "hh_rlhf/harmless-base_test.jsonl.gz"
    assert [r.text for r in load_training_file(raw)] == [(r.prompt, r.response) for r in load_sft_jsonl(raw)]
