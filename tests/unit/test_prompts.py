"""The agent protocol: strict action parsing, chat pieces read off two different templates,
observation and probe tokens."""

import pytest

from igpo.prompts import (
    AgentProtocol,
    ChatPieces,
    encode,
    format_docs,
    observation_ids,
    parse_action,
    probe_token_parts,
    prompt_ids,
)
from igpo.types import Doc

ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize(
    ("text", "kind", "content"),
    [
        ("<think>I need X.</think><search>Andus Zuraston</search>", "search", "Andus Zuraston"),
        ("  <think>ok</think>\n<answer> Garmi </answer>  ", "answer", "Garmi"),
        ("<think></think><answer>1948</answer>", "answer", "1948"),
        ("<think>a</think><search>x</answer>", "malformed", ""),  # mismatched closing tag
        ("<think>a</think><search></search>", "malformed", ""),  # empty query
        ("<think>a</think>", "malformed", ""),  # no action
        ("junk <think>a</think><answer>K</answer>", "malformed", ""),  # text outside tags
        ("<think>a</think><answer>K</answer> trailing", "malformed", ""),
        ("<think>a <search>b</search></think><answer>K</answer>", "malformed", ""),  # nested tags
        ("<think>a</think><search>b</search><answer>K</answer>", "malformed", ""),  # two actions
        ("<search>b</search>", "malformed", ""),  # no think block
    ],
)
def test_parse_action(text, kind, content):
    action = parse_action(text)
    assert (action.kind, action.content) == (kind, content)


def test_parse_action_custom_tags():
    p = AgentProtocol(search=("<tool_call>", "</tool_call>"))
    assert parse_action("<think>t</think><tool_call>q</tool_call>", p).kind == "search"
    assert parse_action("<think>t</think><search>q</search>", p).kind == "malformed"


def test_tag_separators_render_parse_and_tokenise_names_as_in_the_question(tiny_tokenizer):
    p = AgentProtocol(content_sep=" ", think_sep=" ")
    text = p.action("Andus Zuraston was born in Garmi.", "answer", "Garmi")
    assert text == "<think> Andus Zuraston was born in Garmi.</think><answer> Garmi</answer>"
    action = parse_action(text, p)
    assert (action.kind, action.content, action.think) == ("answer", "Garmi", "Andus Zuraston was born in Garmi.")
    assert p.probe_prefix() == "<think> Now there's enough information to answer</think><answer> "
    # the name that opens the think is the same tokens as in a sentence
    in_sentence = encode(tiny_tokenizer, " Andus Zuraston")
    think_ids = encode(tiny_tokenizer, text)
    assert think_ids[1:1 + len(in_sentence)] == in_sentence
    # the default (Search-R1's rendering) has no separators
    assert AgentProtocol().action("t", "search", "q") == "<think>t</think><search>q</search>"


def test_chat_pieces_chatml(tiny_tokenizer):
    pieces = ChatPieces.from_tokenizer(tiny_tokenizer)
    assert pieces.assistant_end == "<|im_end|>"
    assert pieces.user_open == "\n<|im_start|>user\n"
    assert pieces.user_close == "<|im_end|>\n<|im_start|>assistant\n"


def test_chat_pieces_other_template(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = ZEPHYR
    pieces = ChatPieces.from_tokenizer(tok)
    assert pieces.assistant_end == "</s>"
    assert pieces.user_open == "\n<|user|>\n"
    assert pieces.user_close == "</s>\n<|assistant|>\n"


def test_prompt_ends_with_generation_header(tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, "Where was Andus born?")
    text = tiny_tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Question: Where was Andus born?" in text


def test_observation_round_trip_and_truncation(tiny_tokenizer):
    pieces = ChatPieces.from_tokenizer(tiny_tokenizer)
    long_text = " ".join(["Garmi"] * 500)
    docs = [Doc("d1", "Andus Zuraston", "Andus Zuraston was born in Garmi."), Doc("d2", "Long", long_text)]
    ids = observation_ids(tiny_tokenizer, pieces, docs, max_doc_tokens=16)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_end|>\n<|im_start|>user\n<information>(1) Andus Zuraston. Andus Zuraston was born")
    assert text.endswith("</information><|im_end|>\n<|im_start|>assistant\n")
    assert text.count("Garmi") < 30 and "..." in text  # the long document is cut, not the context
    assert format_docs([], tiny_tokenizer) == "No results."


def test_probe_parts(tiny_tokenizer):
    pieces = ChatPieces.from_tokenizer(tiny_tokenizer)
    prefix, gold, suffix = probe_token_parts(tiny_tokenizer, pieces, "Garmi")
    assert tiny_tokenizer.decode(prefix) == "<think>Now there's enough information to answer</think><answer>"
    assert tiny_tokenizer.decode(gold) == "Garmi"
    assert tiny_tokenizer.decode(suffix) == "</answer><|im_end|>"
    assert gold == encode(tiny_tokenizer, "Garmi")
    with pytest.raises(ValueError, match="tokenises to nothing"):
        probe_token_parts(tiny_tokenizer, pieces, "")


def test_probe_parts_are_the_encoding_of_the_whole_probe_text(tiny_tokenizer):
    """The tiny tokenizer's tags are single added tokens, so the exact span equals the gold on its own."""
    pieces, p = ChatPieces.from_tokenizer(tiny_tokenizer), AgentProtocol()
    for gold in ["Garmi", "1948", "Andus Zuraston", "São Paulo", "naïve résumé"]:
        prefix, ids, suffix = probe_token_parts(tiny_tokenizer, pieces, gold, p)
        assert prefix + ids + suffix == encode(tiny_tokenizer, p.probe_prefix() + gold + "</answer><|im_end|>")
        assert ids == encode(tiny_tokenizer, gold)
        assert prefix == encode(tiny_tokenizer, p.probe_prefix())


def test_probe_parts_refuse_a_tokenizer_without_offsets():
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):  # a (python, "slow") tokenizer: no character offsets
        def __init__(self, **kwargs):
            self._vocab = {chr(i): i for i in range(256)}
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return 256

        def get_vocab(self):
            return dict(self._vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self._vocab.get(token, 0)

        def _convert_id_to_token(self, index):
            return chr(index)

    pieces = ChatPieces("<e>", "\n<u>", "<e><a>")
    with pytest.raises(ValueError, match="cannot return character offsets"):
        probe_token_parts(CharTokenizer(), pieces, "Garmi")
