"""The echo detector, the sentence-end trimming and the streaming sentence gate (agent/textcheck.py)."""

from __future__ import annotations

from agent.textcheck import (
    SentenceGate,
    cjk_share,
    ends_at_sentence_end,
    find_echo,
    instruction_sentences,
    max_tokens_for_words,
    repeated_ngram_share,
    split_sentences,
    strip_meta,
    trim_to_sentence_end,
    word_count,
)

PROMPT = (
    "The story is already written. Rewrite only the passage between the text before it and the text after "
    "it.\nReply with the new passage only."
)


def test_instruction_sentences_keep_only_long_ones() -> None:
    got = instruction_sentences([PROMPT])
    assert got == [
        "rewrite only the passage between the text before it and the text after it",
        "reply with the new passage only",
    ]  # "The story is already written." has 5 words: too generic to count


def test_find_echo_is_case_insensitive_and_ignores_spacing_and_quotes() -> None:
    sentences = instruction_sentences([PROMPT])
    out = "Paolo ran.  REWRITE only the passage between the text\nbefore it and the text after it! He hid."
    assert find_echo(out, sentences) == sentences[0]
    assert find_echo("Paolo ran to the hills and hid behind a rock.", sentences) is None
    curly = instruction_sentences(["Write about the cat’s “best” day in the garden."])
    assert find_echo('write about the cat\'s "best" day in the garden', curly)


def test_trim_to_sentence_end() -> None:
    assert trim_to_sentence_end("One two. Three four five") == "One two."
    assert trim_to_sentence_end('He said "go." And then the') == 'He said "go."'
    assert trim_to_sentence_end("Mr.Smith went") == ""  # a dot inside a word is no sentence end
    assert trim_to_sentence_end("no end at all") == ""
    assert trim_to_sentence_end("我们走吧。他们") == "我们走吧。"


def test_ends_at_sentence_end() -> None:
    assert ends_at_sentence_end("Done.")
    assert ends_at_sentence_end('"Done!"  ')
    assert ends_at_sentence_end("好的。")
    assert not ends_at_sentence_end("Not done")
    assert not ends_at_sentence_end("")


def test_counts_and_shares() -> None:
    assert word_count("one two  three") == 3
    assert word_count("我们 go") == 3  # each CJK character counts as a word
    assert cjk_share("我们go") == 0.5
    assert cjk_share("...") == 0.0
    assert repeated_ngram_share("a b c d e f g h") == 0.0
    assert repeated_ngram_share("a b c d a b c d") == 0.4
    assert split_sentences("One. Two? Three!\nFour") == ["One.", "Two?", "Three!", "Four"]
    assert max_tokens_for_words(100) == 192 and max_tokens_for_words(1) == 16


def test_strip_meta() -> None:
    assert strip_meta("Here's the page text with two short sentences: Hattie fell.") == "Hattie fell."
    assert strip_meta("Sure! Here is the new passage:\nThe cat sat.") == "The cat sat."
    assert strip_meta("Here the cat sat: on the mat.") == "Here the cat sat: on the mat."


def _run(gate: SentenceGate, deltas: list[str], truncated: bool) -> str:
    return "".join(gate.feed(d) for d in deltas) + gate.finish(truncated)


def test_gate_drops_echo_meta_and_the_cut_tail() -> None:
    gate = SentenceGate(instruction_sentences([PROMPT]))
    out = _run(
        gate,
        [
            "Here is the new passage: The cat ",
            "sat. Rewrite only the passage between the text before it",
            " and the text after it. The dog ran. And then",
        ],
        truncated=True,
    )
    assert out == "The cat sat. The dog ran."
    assert any("Rewrite only" in d for d in gate.dropped) and "And then" in gate.dropped


def test_gate_keeps_a_natural_ending_without_punctuation() -> None:
    gate = SentenceGate([])
    assert _run(gate, ["long ", "ago"], truncated=False) == "long ago"
    gate = SentenceGate([])
    assert _run(gate, ["long ", "ago"], truncated=True) == "long ago"  # nothing better to keep


def test_gate_stops_at_the_sentence_end_near_the_word_limit() -> None:
    gate = SentenceGate([], word_limit=10)
    deltas = ["One two three four five six. ", "Seven eight nine ten eleven. ", "Twelve thirteen fourteen."]
    out = ""
    for d in deltas:
        out += gate.feed(d)
        if gate.full:
            break
    out += gate.finish(truncated=True)
    assert out == "One two three four five six. Seven eight nine ten eleven."
    assert gate.full
    # a sentence that would overshoot by > 20% once 80% are there is dropped
    gate = SentenceGate([], word_limit=10)
    out = _run(gate, ["One two three four five six seven eight nine. ", "A b c d e f. "], truncated=False)
    assert out.strip() == "One two three four five six seven eight nine."
    # below 80%, an overshooting sentence is skipped and the model goes on; the first one always stays
    gate = SentenceGate([], word_limit=10)
    out = _run(
        gate, ["One two three four five six. ", "A b c d e f g h. ", "Seven eight nine. "], truncated=True
    )
    assert out == "One two three four five six. Seven eight nine."
    gate = SentenceGate([], word_limit=3)
    assert _run(gate, ["The kite flew far over the river and the town. "], truncated=False).startswith(
        "The kite"
    )


def test_an_echo_with_contractions_is_still_an_echo() -> None:
    """SmolLM2 wrote "You're a creative picture book writer." on a page whose system prompt says "You are"."""
    from agent.textcheck import normalize, strip_echo

    system = (
        "You are a creative picture book writer. You write short, vivid sentences that young children enjoy."
    )
    page = "You're a creative picture book writer. Hattie's bell rang, and she didn't stop at the hill."
    assert (
        strip_echo(page, instruction_sentences([system]))
        == "Hattie's bell rang, and she didn't stop at the hill."
    )
    assert normalize("I can't, won't, don't; it's Ada's, we'll, they've, I'd") == (
        "i cannot, will not, do not; it is ada's, we will, they have, i would"
    )


def test_assistant_chatter_is_dropped_but_never_empties_the_text() -> None:
    from agent.textcheck import strip_chatter

    page = (
        "I'm so happy to help you create wonderful and special books for your readers! "
        "Finn jumped in the pond. I hope you enjoy the story! Let me know if you would like more pages."
    )
    assert strip_chatter(page) == "Finn jumped in the pond."
    # a character's words are a story's, not chatter: dialogue starts with a quote, and "glad to see" is not
    # "happy to help you create"
    dialogue = '"I am so happy to help you make a raft," said the duck. I am glad to see you, said Finn.'
    assert strip_chatter(dialogue) == dialogue
    assert strip_chatter("I hope you enjoy this story!") == "I hope you enjoy this story!"  # nothing else
