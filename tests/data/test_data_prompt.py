"""Prompt engine: exact template strings, masks by prefix rendering, token labels."""

from __future__ import annotations

import pytest

from tscale.core.result import Err, Ok
from tscale.data import TASKS, Encoder, generate, train_tokenizer
from tscale.data.prompt import (
    TEMPLATE_NAMES,
    ChatTemplate,
    get_template,
    make_sample_counter,
    normalize_sharegpt,
    render,
    render_messages,
    template_from_tokenizer_config,
    to_messages,
    tokenize_rendered,
)
from tscale.errors import DataError

MARKERS = [
    "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|begin_of_text|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "[INST]", "[/INST]",
    "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>",
]  # fmt: skip

SYS = {"role": "system", "content": "You are a helpful assistant"}
CONV = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
CHAT = {"messages": [SYS, *CONV[:4]]}  # ends with an assistant turn: a training example


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    texts = [m["content"] for m in CONV] + ["reverse: c a t t a c", "the cat sat on the mat"] * 5
    tok = train_tokenizer(texts * 5, 320)
    tok.add_special_tokens(MARKERS)
    return Encoder.from_tokenizer(tok)


# ---- exact strings ---------------------------------------------------------------------------

EXPECTED_WITH_GENERATION_PROMPT = {
    # Hand-written from each family's documented format (llama.cpp's test-chat-template cases
    # use the same conversation).
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello"
        "<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you"
        "<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\n"
        "Another question<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHello"
        "<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWho are you"
        "<|im_end|>\n<|im_start|>assistant\n   I am an assistant   <|im_end|>\n<|im_start|>user\n"
        "Another question<|im_end|>\n<|im_start|>assistant\n"
    ),
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful "
        "assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>"
        "user<|end_header_id|>\n\nWho are you<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\n\nI am an assistant<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nAnother question<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are a helpful assistant\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi there<end_of_turn>\n<start_of_turn>user\nWho are you"
        "<end_of_turn>\n<start_of_turn>model\nI am an assistant<end_of_turn>\n<start_of_turn>user\n"
        "Another question<end_of_turn>\n<start_of_turn>model\n"
    ),
    "alpaca": (
        "You are a helpful assistant\n\n### Instruction:\nHello\n\n### Response:\nHi there\n\n"
        "### Instruction:\nWho are you\n\n### Response:\n   I am an assistant   \n\n"
        "### Instruction:\nAnother question\n\n### Response:\n"
    ),
    "plain": "You are a helpful assistantHelloHi thereWho are you   I am an assistant   "
    "Another question",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_WITH_GENERATION_PROMPT))
def test_builtin_templates_render_the_official_strings(name):
    text = render_messages(name, [SYS, *CONV], add_generation_prompt=True)
    assert text == EXPECTED_WITH_GENERATION_PROMPT[name]


def test_templates_without_system_prompt():
    assert render_messages("mistral", CONV) == (
        "<s>[INST] Hello [/INST]Hi there</s>[INST] Who are you [/INST]   I am an assistant   </s>"
        "[INST] Another question [/INST]"
    )
    assert render_messages("qwen", CONV[:2]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there"
        "<|im_end|>\n"
    )
    assert render_messages("gemma", CONV[:2]) == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi there"
        "<end_of_turn>\n"
    )


def test_alpaca_records_render_stanford_alpaca_prompts():
    with_input = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
    rendered = render(with_input, "alpaca").value
    assert rendered.text == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n5"
    )
    assert [rendered.text[a:b] for a, b in rendered.trained_spans] == ["5"]
    no_input = render({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca").value
    assert no_input.text == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\nhi"
    )
    # Other templates see the input after a blank line in the user message.
    chat = render(with_input, "chatml").value.text
    assert "<|im_start|>user\nAdd the numbers.\n\n2 3<|im_end|>" in chat


def test_parity_with_transformers_renderer():
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    conversations = [[SYS, *CONV], CONV, CONV[:2], [SYS, *CONV[:2]]]
    for name in TEMPLATE_NAMES:
        tpl = get_template(name)
        for conv in conversations:
            for gen in (False, True):
                try:
                    ours = render_messages(tpl, conv, add_generation_prompt=gen)
                except Exception as e:  # the official template rejects it (mistral + system)
                    ours = type(e).__name__
                try:
                    [theirs], _ = hf.render_jinja_template(
                        conversations=[conv],
                        chat_template=tpl.source,
                        add_generation_prompt=gen,
                        bos_token=tpl.bos_token,
                        eos_token=tpl.eos_token,
                    )
                except Exception as e:
                    theirs = type(e).__name__
                assert ours == theirs, (name, conv, gen)


# ---- spans and masks -------------------------------------------------------------------------


def _trained_text(encoder: Encoder, example: dict) -> list[str]:
    """The decoded runs of trained targets (labels), split where the training stops."""
    runs, cur = [], []
    for lab in example["labels"]:
        if lab == -100:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(lab)
    if cur:
        runs.append(cur)
    return [encoder.tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def test_multi_turn_assistant_only_trains_contents_and_end_tokens(encoder):
    sample = render(CHAT, "chatml", loss_mode="assistant_only").value
    assert [sample.text[a:b] for a, b in sample.trained_spans] == [
        "Hi there<|im_end|>",
        "   I am an assistant   <|im_end|>",
    ]
    ex = tokenize_rendered(sample, encoder, add_bos=False, add_eos=False).value
    assert _trained_text(encoder, ex) == ["Hi there<|im_end|>", "   I am an assistant   <|im_end|>"]
    last = render(CHAT, "chatml", loss_mode="last_turn_only").value
    ex = tokenize_rendered(last, encoder, add_bos=False, add_eos=False).value
    assert _trained_text(encoder, ex) == ["   I am an assistant   <|im_end|>"]
    for name, end in [("llama-3", "<|eot_id|>"), ("gemma", "<end_of_turn>")]:
        s = render(CHAT, name).value
        assert [s.text[a:b] for a, b in s.trained_spans] == [
            "Hi there" + end,
            "I am an assistant" + end,
        ]


# A template with no generation tags and a role header that is not a plain prefix of the turn.
NO_TAGS = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] + '<|end|>' }}"
    "{% else %}{{ '<|assistant|>' + m['content'] | upper + '<|end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def test_masks_by_prefix_rendering_without_generation_tags(encoder):
    tpl = ChatTemplate.from_jinja(NO_TAGS, name="no-tags")
    record = {"messages": [CONV[0], {"role": "assistant", "content": "hi there"}, *CONV[2:4]]}
    sample = render(record, tpl).value
    assert sample.text.startswith("<|user|>Hello<|end|><|assistant|>HI THERE<|end|>")
    ex = tokenize_rendered(sample, encoder, add_bos=True, add_eos=True).value
    # Rendered (upper-cased) contents and their end tokens are trained, nothing else; the EOS
    # after the final assistant turn is trained too.
    eos = encoder.tokenizer.id_to_token(encoder.eos_id)
    assert _trained_text(encoder, ex) == ["HI THERE<|end|>", "   I AM AN ASSISTANT   <|end|>" + eos]
    assert ex["input_ids"][0] == encoder.bos_id and ex["labels"][-1] == -100


def test_generation_tags_are_accepted_and_agree_with_transformers():
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    tagged = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    )
    sample = render(CHAT, ChatTemplate.from_jinja(tagged)).value
    [text], [indices] = hf.render_jinja_template(
        conversations=[CHAT["messages"]], chat_template=tagged, return_assistant_tokens_mask=True
    )
    assert sample.text == text
    assert list(sample.trained_spans) == [tuple(i) for i in indices]


def test_prefix_unstable_template_is_an_error():
    # Mistral v0.3 style: the system text goes before the *last* user message, so it moves (and
    # vanishes once an assistant turn is last). A mask from prefixes would be wrong: Err.
    moving_system = (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set msgs = messages[1:] %}{% else %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% if m['role'] == 'user' %}{% if loop.last and sys is defined %}"
        "{{ '[INST] ' + sys + '\\n\\n' + m['content'] + '[/INST]' }}{% else %}"
        "{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}{% else %}"
        "{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    )
    got = render(CHAT, moving_system)
    assert isinstance(got, Err) and "not prefix-stable" in got.reason
    assert isinstance(render({"messages": CONV[:4]}, moving_system), Ok)  # no system: stable


def test_all_masked_is_an_error(encoder):
    no_reply = render({"messages": CONV[:1]}, "chatml").value  # nothing to train on
    got = tokenize_rendered(no_reply, encoder, add_bos=True, add_eos=True, where="f.jsonl:row 2")
    assert isinstance(got, Err) and got.reason.startswith("no trained tokens")
    assert got.where == "f.jsonl:row 2"
    empty = render({"prompt": "hello", "completion": ""}, "plain").value
    got = tokenize_rendered(empty, encoder, add_bos=True, add_eos=False)
    assert isinstance(got, Err) and "empty" in got.reason


def test_completion_only_needs_one_final_reply():
    assert isinstance(
        render({"prompt": "a", "completion": "b"}, "chatml", loss_mode="completion_only"), Ok
    )
    got = render(CHAT, "chatml", loss_mode="completion_only")
    assert isinstance(got, Err) and "exactly one assistant message" in got.reason
    with pytest.raises(DataError, match="loss_mode"):
        render(CHAT, "chatml", loss_mode="everything")


def test_plain_template_matches_the_encoder(encoder):
    # The existing simple path (Encoder.encode_example) is the plain template with BOS and EOS.
    for rec in generate(list(TASKS), 20, seed=1, min_items=2, max_items=5):
        sample = render(rec, "plain", loss_mode="completion_only").value
        ours = tokenize_rendered(sample, encoder, add_bos=True, add_eos=True, max_length=64)
        assert ours.value == encoder.encode_example(rec, 64).value


def test_bos_is_never_doubled_and_eos_trained_only_after_a_trained_turn(encoder):
    tpl = get_template("llama-3").with_tokens(bos_token="<|bos|>", eos_token="<|eos|>")
    ex = tokenize_rendered(render(CHAT, tpl).value, encoder, add_bos=True, add_eos=True).value
    assert ex["input_ids"][:2] != [encoder.bos_id] * 2 and ex["input_ids"][0] == encoder.bos_id
    assert ex["labels"][-2] == encoder.eos_id  # conversation ends with a trained turn
    open_end = render({"messages": [*CONV[:2], CONV[2]]}, "chatml").value
    ex = tokenize_rendered(open_end, encoder, add_bos=True, add_eos=True).value
    assert ex["input_ids"][-1] == encoder.eos_id and encoder.eos_id not in ex["labels"]
    with pytest.raises(DataError, match="bos_id"):
        tokenize_rendered(open_end, encoder.tokenizer, add_bos=True, add_eos=False)


def test_max_length_and_sample_counter(encoder):
    sample = render(CHAT, "chatml").value
    ex = tokenize_rendered(sample, encoder, add_bos=True, add_eos=True).value
    count = make_sample_counter("chatml", encoder, add_bos=True, add_eos=True)
    assert count(CHAT) == len(ex["input_ids"])
    n = len(ex["input_ids"])
    too_long = tokenize_rendered(sample, encoder, add_bos=True, add_eos=True, max_length=n - 1)
    assert isinstance(too_long, Err) and too_long.reason.startswith("too long")
    mistral = make_sample_counter("mistral", encoder, add_bos=False, add_eos=False)
    with pytest.raises(DataError, match="roles must alternate"):
        mistral(CHAT)  # unrenderable records raise; fit_record turns that into an Err


# ---- records ---------------------------------------------------------------------------------


def test_sharegpt_and_record_formats():
    share = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    assert normalize_sharegpt(share).value == {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    }
    assert to_messages(share).value == normalize_sharegpt(share).value["messages"]
    bad = normalize_sharegpt({"conversations": [{"from": "alien", "value": "x"}]})
    assert isinstance(bad, Err) and "unknown 'from'" in bad.reason
    assert to_messages({"prompt": "p", "completion": "c"}, system="S").value == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "c"},
    ]
    # The record's own system prompt wins over the default.
    assert to_messages(CHAT, system="other").value[0] == SYS
    for record, reason in [
        ({"text": "x"}, "unknown record format"),
        ({"prompt": "p"}, "completion missing"),
        ({"messages": []}, "messages missing, empty"),
        ({"messages": [{"role": "user", "content": None}]}, "content is not a string"),
        ({"instruction": "i", "output": 3}, "output not a string"),
    ]:
        got = render(record, "chatml", where="x:1")
        assert isinstance(got, Err) and reason in got.reason and got.where == "x:1"


def test_template_errors_and_sources():
    got = render(CHAT, "mistral")  # the official Mistral template has no system role
    assert isinstance(got, Err) and "roles must alternate" in got.reason
    with pytest.raises(DataError, match="unknown chat template"):
        get_template("vicuna")
    with pytest.raises(DataError, match="not valid Jinja2"):
        ChatTemplate.from_jinja("{% for m in messages %}")
    assert get_template(NO_TAGS).source == NO_TAGS
    config = {
        "chat_template": [
            {"name": "default", "template": NO_TAGS},
            {"name": "tool_use", "template": "x"},
        ],
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
    }
    tpl = template_from_tokenizer_config(config)
    assert (tpl.source, tpl.bos_token, tpl.eos_token) == (NO_TAGS, "<s>", "</s>")
    with pytest.raises(DataError, match="no chat_template"):
        template_from_tokenizer_config({"bos_token": "<s>"})
