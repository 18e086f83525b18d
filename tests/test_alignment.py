"""Alignment by text between tokenizers: offsets, spans and predicting positions checked by hand on four
tokenizers built in code (character-level, word-level, byte-level BPE with 'Ġ', SentencePiece-style '▁' with
byte fallback), the decoding fallback against the fast offsets, and the vocabulary map's normalisation."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fisherkd.functional.cross_tokenizer import span_kl_loss, uld_loss
from fisherkd.hf.alignment import (
    Span,
    align_offsets,
    align_texts,
    byte_level_alphabet,
    is_byte_level,
    normalize_token,
    token_offsets,
    vocab_map,
)

TEXTS = ["hello world", "a  b\n\nc", "café 😀"]
GPT2 = byte_level_alphabet()


def bpe_vocab(specials: list[str], alphabet: list[str], words: list[str]) -> tuple[dict, list]:
    """A BPE vocabulary holding ``alphabet`` and every prefix of each word, merged left to right."""
    vocab = {token: i for i, token in enumerate(specials)}
    for a in alphabet:
        vocab.setdefault(a, len(vocab))
    merges = []
    for word in words:
        piece = word[0]
        for c in word[1:]:
            merges.append((piece, c))
            piece += c
            vocab.setdefault(piece, len(vocab))
    return vocab, merges


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, BOS first."""
    chars = sorted(set("".join(TEXTS)) | set("hi</s>"))
    vocab = {"<unk>": 0, "<s>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words; whitespace belongs to no token; no special tokens added."""
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(["hello", "world", "a", "b", "c"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: a space is 'Ġ', '\\n' is 'Ċ'; EOS appended. 'ĠðŁĺ' is a space and the first three
    bytes of 😀 (F0 9F 98 80)."""
    vocab, merges = bpe_vocab(["<|endoftext|>"], [GPT2[b] for b in range(256)], ["hello", "Ġworld", "ĠðŁĺ"])
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama/Gemma style: '▁' for a space (prepended to the first word), '<0xNN>' byte fallback, BOS first."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab, merges = bpe_vocab(specials, [*"abcdefghijklmnopqrstuvwxyz", "▁"], ["▁hello", "▁world", "▁▁"])
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    return {
        "char": char_tokenizer(),
        "word": word_tokenizer(),
        "bl": byte_level_tokenizer(),
        "sp": sentencepiece_tokenizer(),
    }


def tokens(tok, text):
    ids, offsets, keep = token_offsets(tok, text)
    return tok.convert_ids_to_tokens(ids), offsets, keep


def spans_of(text, student, teacher):
    s_ids, s_off, s_keep = token_offsets(student, text)
    t_ids, t_off, t_keep = token_offsets(teacher, text)
    return align_offsets(s_off, t_off, s_keep, t_keep)


def pairs_of(text, student, teacher, **kw):
    a = align_texts([text], student, teacher, **kw)
    return list(zip(a.student_positions.tolist(), a.teacher_positions.tolist(), a.single_token.tolist()))


# ----------------------------------------------------------------------------------------------------------
# The test tokenizers themselves (what the hand-checked cases below start from)


def test_the_hand_made_tokenizers_split_as_the_cases_assume(toks):
    assert tokens(toks["bl"], "hello world") == (
        ["hello", "Ġworld", "<|endoftext|>"],
        [(0, 5), (5, 11), (0, 0)],
        [True, True, False],
    )
    assert tokens(toks["sp"], "hello world")[:2] == (["<s>", "▁hello", "▁world"], [(0, 0), (0, 5), (5, 11)])
    # the prepended '▁' of the first word is a token of its own sharing the first character
    assert tokens(toks["sp"], "café 😀")[:2] == (
        ["<s>", "▁", "c", "a", "f", "<0xC3>", "<0xA9>", "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"],
        [(0, 0), (0, 1), (0, 1), (1, 2), (2, 3), (3, 4), (3, 4), (4, 5)] + [(5, 6)] * 4,
    )
    assert tokens(toks["bl"], "a  b\n\nc")[:2] == (
        ["a", "Ġ", "Ġ", "b", "Ċ", "Ċ", "c", "<|endoftext|>"],
        [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (0, 0)],
    )
    assert tokens(toks["sp"], "a  b\n\nc")[:2] == (
        ["<s>", "▁", "a", "▁▁", "b", "<0x0A>", "<0x0A>", "c"],
        [(0, 0), (0, 1), (0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 7)],
    )
    assert tokens(toks["word"], "a  b\n\nc")[:2] == (["a", "b", "c"], [(0, 1), (3, 4), (6, 7)])


# ----------------------------------------------------------------------------------------------------------
# Spans and pairs, by hand


def test_characters_against_words(toks):
    # char: <s> h e l l o ' ' w o r l d (indices 0..11); word: hello world (0, 1), the space in neither word
    spans = spans_of("hello world", toks["char"], toks["word"])
    assert spans == [Span((1, 6), (0, 1), (0, 5)), Span((6, 12), (1, 2), (5, 11))]
    # the word tokenizer has no BOS: nothing predicts "hello" on its side; 'o' (5) and "hello" (0) predict the rest
    assert pairs_of("hello world", toks["char"], toks["word"]) == [(5, 0, False)]


def test_byte_level_space_against_sentencepiece_space(toks):
    # 'Ġworld' and '▁world' both cover " world" (5, 11)
    spans = spans_of("hello world", toks["bl"], toks["sp"])
    assert spans == [Span((0, 1), (1, 2), (0, 5)), Span((1, 2), (2, 3), (5, 11))]
    assert pairs_of("hello world", toks["bl"], toks["sp"]) == [(0, 1, True)]
    # roles swapped: the same single pair, mirrored
    assert pairs_of("hello world", toks["sp"], toks["bl"]) == [(1, 0, True)]


def test_unicode_byte_fallback_and_emoji(toks):
    # char: <s> c a f é ' ' 😀 (0..6); sp: <s> ▁ c a f <0xC3> <0xA9> ▁ <0xF0> <0x9F> <0x98> <0x80> (0..11)
    spans = spans_of("café 😀", toks["char"], toks["sp"])
    assert spans == [
        Span((1, 2), (1, 3), (0, 1)),  # c ↔ ▁ c (the prepended '▁' shares the 'c')
        Span((2, 3), (3, 4), (1, 2)),  # a ↔ a
        Span((3, 4), (4, 5), (2, 3)),  # f ↔ f
        Span((4, 5), (5, 7), (3, 4)),  # é ↔ its two UTF-8 bytes
        Span((5, 6), (7, 8), (4, 5)),  # ' ' ↔ ▁
        Span((6, 7), (8, 12), (5, 6)),  # 😀 ↔ its four bytes, never cut apart
    ]
    # both BOS tokens predict the first span: (0, 0)
    assert pairs_of("café 😀", toks["char"], toks["sp"]) == [
        (0, 0, False),
        (1, 2, True),
        (2, 3, True),
        (3, 4, False),
        (4, 6, True),
        (5, 7, False),
    ]
    # byte-level: c a f Ã © ĠðŁĺ Ģ, where 'ĠðŁĺ' (4, 6) ends inside the emoji and 'Ģ' (5, 6) completes it: the space
    # and the emoji form one span
    assert tokens(toks["bl"], "café 😀")[0][3:7] == ["Ã", "©", "ĠðŁĺ", "Ģ"]
    assert tokens(toks["bl"], "café 😀")[1][3:7] == [(3, 4), (3, 4), (4, 6), (5, 6)]
    spans = spans_of("café 😀", toks["bl"], toks["char"])
    assert spans[-2:] == [Span((3, 5), (4, 5), (3, 4)), Span((5, 7), (5, 7), (4, 6))]


def test_repeated_spaces_and_newlines(toks):
    # bl: a Ġ Ġ b Ċ Ċ c <eos> (0..7); sp: <s> ▁ a ▁▁ b <0x0A> <0x0A> c (0..7)
    spans = spans_of("a  b\n\nc", toks["bl"], toks["sp"])
    assert [(s.student, s.teacher, s.text) for s in spans] == [
        ((0, 1), (1, 3), (0, 1)),
        ((1, 3), (3, 4), (1, 3)),  # Ġ Ġ ↔ ▁▁
        ((3, 4), (4, 5), (3, 4)),
        ((4, 5), (5, 6), (4, 5)),
        ((5, 6), (6, 7), (5, 6)),
        ((6, 7), (7, 8), (6, 7)),
    ]
    assert pairs_of("a  b\n\nc", toks["bl"], toks["sp"]) == [
        (0, 2, False),
        (2, 3, True),
        (3, 4, True),
        (4, 5, True),
        (5, 6, True),
    ]
    # whitespace that no word covers joins the span after it
    spans = spans_of("a  b\n\nc", toks["char"], toks["word"])
    assert spans == [Span((1, 2), (0, 1), (0, 1)), Span((2, 5), (1, 2), (1, 4)), Span((5, 8), (2, 3), (4, 7))]


def test_special_tokens_are_in_no_span(toks):
    for text in TEXTS:
        for s_name, t_name in [("char", "sp"), ("bl", "sp"), ("bl", "char")]:
            s_ids, s_off, s_keep = token_offsets(toks[s_name], text)
            t_ids, t_off, t_keep = token_offsets(toks[t_name], text)
            spans = align_offsets(s_off, t_off, s_keep, t_keep)
            # spans tile the text and every token that carries text is in exactly one span
            assert spans[0].text[0] == 0 and spans[-1].text[1] == len(text)
            assert all(a.text[1] == b.text[0] for a, b in zip(spans, spans[1:]))
            for keep, ranges in ((s_keep, [s.student for s in spans]), (t_keep, [s.teacher for s in spans])):
                covered = [i for a, b in ranges for i in range(a, b)]
                assert covered == sorted(set(covered))
                assert {i for i, k in enumerate(keep) if k} == set(covered)
    # a special token spelled in the text carries no text: the alignment stops before it
    ids, offsets, keep = token_offsets(toks["sp"], "hi</s>")
    assert toks["sp"].convert_ids_to_tokens(ids)[-1] == "</s>" and keep[-1] is False
    assert spans_of("hi</s>", toks["char"], toks["sp"])[-1].text[1] == 2


def test_truncation_leaves_the_tail_unaligned(toks):
    # char keeps <s> h e l l o: "hello" still aligns with the word; " world" is in no span
    a = align_texts(["hello world"], toks["char"], toks["word"], max_length=6)
    assert a.spans == [[Span((1, 6), (0, 1), (0, 5))]]
    assert a.student_input_ids.shape == (1, 6) and a.teacher_input_ids.shape == (1, 2)
    # cut inside the first word: no shared boundary at all
    assert align_texts(["hello world"], toks["char"], toks["word"], max_length=3).spans == [[]]


def test_completion_start_keeps_only_the_completion(toks):
    # "café" is the prompt: the pairs predicting ' ' and 😀 remain (see test_unicode_byte_fallback_and_emoji)
    assert pairs_of("café 😀", toks["char"], toks["sp"], completion_start=[4]) == [(4, 6, True), (5, 7, False)]


def test_a_batch_is_right_padded_and_rows_index_the_flat_logits(toks):
    a = align_texts(["hello world", "a  b\n\nc"], toks["bl"], toks["sp"])
    assert a.student_input_ids.shape == (2, 8) and a.teacher_input_ids.shape == (2, 8)
    assert a.student_attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
    assert a.teacher_attention_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
    assert a.batch.tolist() == [0, 1, 1, 1, 1, 1]
    assert a.student_positions.tolist() == [0, 0, 2, 3, 4, 5]
    assert a.teacher_positions.tolist() == [1, 2, 3, 4, 5, 6]
    assert a.student_rows.tolist() == [0, 8, 10, 11, 12, 13]
    assert a.teacher_rows.tolist() == [1, 10, 11, 12, 13, 14]
    # the token after each predicting position starts the same text on both sides
    for b, i, j in zip(a.batch.tolist(), a.student_positions.tolist(), a.teacher_positions.tolist()):
        text = ["hello world", "a  b\n\nc"][b]
        s_start = token_offsets(toks["bl"], text)[1][i + 1][0]
        t_start = token_offsets(toks["sp"], text)[1][j + 1][0]
        assert s_start == t_start


def test_the_losses_run_on_an_alignment(toks):
    a = align_texts(TEXTS, toks["bl"], toks["sp"])
    m = vocab_map(toks["bl"], toks["sp"])
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(*a.student_input_ids.shape, len(toks["bl"]) + 3, generator=g).requires_grad_()  # padded width
    zt = torch.randn(*a.teacher_input_ids.shape, len(toks["sp"]), generator=g)
    rows = {"student_rows": a.student_rows, "teacher_rows": a.teacher_rows}
    for loss in (uld_loss(zs, zt, **rows), span_kl_loss(zs, zt, m.student_ids, m.teacher_ids, **rows)):
        (grad,) = torch.autograd.grad(loss, zs)
        assert torch.isfinite(loss) and loss > 0
        # only the predicting positions receive a gradient
        touched = grad.flatten(0, 1).abs().sum(-1).nonzero().squeeze(1)
        assert touched.tolist() == sorted(set(a.student_rows.tolist()))


# ----------------------------------------------------------------------------------------------------------
# Offsets by decoding (tokenizers without offsets)


@pytest.mark.parametrize("name", ["char", "bl", "sp"])
@pytest.mark.parametrize("text", [*TEXTS, " hello", "hello  world\n"])
def test_decoding_fallback_gives_the_fast_offsets(toks, name, text):
    assert token_offsets(toks[name], text, method="decode") == token_offsets(toks[name], text, method="fast")


def test_decoding_fallback_spans_for_a_decoder_that_moves_spaces(toks):
    # WordLevel decodes "hello world" by joining words with a space: the space goes to "world" (5, 11) instead
    # of no token (6, 11); the spans are the same
    ids, offsets, keep = token_offsets(toks["word"], "hello world", method="decode")
    assert offsets == [(0, 5), (5, 11)]
    s = token_offsets(toks["char"], "hello world")
    assert align_offsets(s[1], offsets, s[2], keep) == spans_of("hello world", toks["char"], toks["word"])


def test_decoding_fallback_refuses_a_decoder_that_changes_the_text(toks):
    with pytest.raises(ValueError, match=r"tokens 0\.\.1 decode to 'a b', which does not start the text"):
        token_offsets(toks["word"], "a  b", method="decode")
    with pytest.raises(ValueError, match="method must be 'auto', 'fast' or 'decode'"):
        token_offsets(toks["word"], "a", method="slow")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got one string; wrap it in a list"):
        align_texts("hello", toks["char"], toks["word"])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Vocabulary map


@pytest.mark.parametrize(
    "token, byte_level, expected",
    [
        ("Ġhello", True, b" hello"),
        ("Ċ", True, b"\n"),
        ("ĠĠ", True, b"  "),
        ("Ã©", True, "é".encode()),
        ("ðŁĺĢ", True, "😀".encode()),
        ("▁hello", False, b" hello"),
        ("<0x0A>", False, b"\n"),
        ("<0xC3>", False, b"\xc3"),
        ("é", False, "é".encode()),
        ("hello", False, b"hello"),
    ],
)
def test_normalize_token(token, byte_level, expected):
    assert normalize_token(token, byte_level) == expected


def test_byte_level_alphabet_is_gpt2s():
    assert len(set(GPT2.values())) == 256
    assert (GPT2[ord(" ")], GPT2[ord("\n")], GPT2[ord("A")], GPT2[0xAD], GPT2[0]) == ("Ġ", "Ċ", "A", "Ń", "Ā")


def test_byte_level_detection(toks):
    assert is_byte_level(toks["bl"])
    assert not any(is_byte_level(toks[name]) for name in ("sp", "char", "word"))


def test_vocab_map_by_hand():
    bl_vocab = {"<|endoftext|>": 0, "Ġ": 1, "h": 2, "Ġh": 3, "Ċ": 4, "Ã": 5, "©": 6, "Ã©": 7, "hi": 8, "i": 9}
    bl = Tokenizer(models.BPE(bl_vocab, [("Ġ", "h"), ("Ã", "©"), ("h", "i")]))
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl = PreTrainedTokenizerFast(tokenizer_object=bl, eos_token="<|endoftext|>", pad_token="<pad>")
    sp_vocab = {"<unk>": 0, "<s>": 1, "<pad>": 2, "<0x0A>": 3, "<0xC3>": 4, "<0xA9>": 5, "<0x68>": 6, "▁": 7}
    sp_vocab.update({"h": 8, "▁h": 9, "é": 10, "hi": 11, "Ġ": 12, "<|endoftext|>": 13, "i": 14})
    sp = Tokenizer(models.BPE(sp_vocab, [("▁", "h"), ("h", "i")], byte_fallback=True, unk_token="<unk>"))
    sp = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")
    m = vocab_map(bl, sp)
    # teacher (sp) id → student (bl) id:
    expected = {
        2: 10,  # the special <pad> of both (added to bl as id 10)
        3: 4,  # '\n': <0x0A> ↔ Ċ
        4: 5,  # byte 0xC3: <0xC3> ↔ Ã
        5: 6,  # byte 0xA9: <0xA9> ↔ ©
        7: 1,  # ' ': ▁ ↔ Ġ
        8: 2,  # 'h': h ↔ h (the plain token; the byte-fallback <0x68> (6) stays unpaired)
        9: 3,  # ' h': ▁h ↔ Ġh
        10: 7,  # 'é': é ↔ Ã©
        11: 8,  # 'hi'
        14: 9,  # 'i'
    }
    assert dict(zip(m.teacher_ids.tolist(), m.student_ids.tolist())) == expected
    assert m.teacher_ids.tolist() == sorted(expected)
    # unpaired: sp's 'Ġ' (12) is the text "Ġ", not a space; '<|endoftext|>' is text in sp (13) but special in bl
    assert (m.shared, m.student_size, m.teacher_size) == (10, 11, 15)
    assert m.student_fraction == pytest.approx(10 / 11) and m.teacher_fraction == pytest.approx(10 / 15)
