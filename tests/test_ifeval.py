"""Instruction following, table-driven: responses that follow an instruction and that do not."""
import pytest

from prorl_actors.tasks import ifeval

FOLLOWS = [
    ({"kind": "word_count", "relation": "at least", "num": 5}, "one two three four five"),
    ({"kind": "word_count", "relation": "at most", "num": 3}, "Short and sweet."),
    ({"kind": "sentence_count", "relation": "exactly", "num": 2}, "It rains. We stay in!"),
    ({"kind": "paragraph_count", "relation": "exactly", "num": 3}, "First.\n\nSecond.\n\nThird."),
    ({"kind": "paragraph_count", "relation": "exactly", "num": 2}, "First part.\n***\nSecond part."),
    ({"kind": "keywords_include", "keywords": ["river", "Bridge"]}, "The bridge crosses the River Thames."),
    ({"kind": "keywords_exclude", "keywords": ["cat"]}, "Dogs and concatenation are fine."),
    ({"kind": "keyword_frequency", "keyword": "data", "relation": "at least", "num": 2}, "Data in, data out."),
    ({"kind": "letter_frequency", "letter": "z", "relation": "exactly", "num": 3}, "Zebras buzz."),
    ({"kind": "capital_word_frequency", "relation": "at least", "num": 2}, "This is VERY IMPORTANT."),
    ({"kind": "json_format"}, '{"name": "x", "n": [1, 2]}'),
    ({"kind": "json_format"}, '```json\n{"ok": true}\n```'),
    ({"kind": "bullet_count", "num": 3}, "Plan:\n* one\n* two\n- three"),
    ({"kind": "highlighted_sections", "num": 2}, "Some *important* and *urgent* things."),
    ({"kind": "title"}, "<<A Day at the Sea>>\nWe swam."),
    ({"kind": "quotation"}, '"Everything here is quoted."'),
    ({"kind": "start_phrase", "phrase": "Dear team"}, "Dear team, the release is ready."),
    ({"kind": "end_phrase", "phrase": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?"),
    ({"kind": "lowercase"}, "all of this is lowercase, 123."),
    ({"kind": "uppercase"}, "ALL OF THIS IS SHOUTED!"),
    ({"kind": "no_commas"}, "No commas here at all."),
    ({"kind": "placeholders", "num": 2}, "Send it to [address] by [date]."),
    ({"kind": "numbered_sections", "marker": "Section", "num": 2}, "Section 1\nIntro\nSection 2\nEnd"),
    ({"kind": "postscript", "marker": "P.S."}, "Best wishes.\nP.S. Bring snacks."),
    ({"kind": "postscript", "marker": "P.S."}, "best wishes.\np.s. bring snacks."),     # any case, as IFEval
    ({"kind": "lowercase"}, "<think>Let me PLAN this.</think>\nhere is my lowercase answer."),   # thinking ignored
    ({"kind": "nth_paragraph_first_word", "num": 2, "nth": 2, "first_word": "then"},
     "First we wait.\n\nThen we go."),
    ({"kind": "constrained_response"}, "Let me think. My answer is maybe."),
    ({"kind": "two_responses"}, "Cats are calm.\n******\nDogs are loyal."),
    ({"kind": "word_count", "relation": "less than", "num": 4}, "one two three"),
    ({"kind": "lowercase"}, "<think>Reasoning In Capitals</think>all lowercase here"),
]

DOES_NOT = [
    ({"kind": "word_count", "relation": "at least", "num": 5}, "only four words here"),
    ({"kind": "word_count", "relation": "at most", "num": 3}, "This has far too many words."),
    ({"kind": "sentence_count", "relation": "exactly", "num": 2}, "One. Two. Three."),
    ({"kind": "paragraph_count", "relation": "exactly", "num": 3}, "First.\n\nSecond."),
    ({"kind": "keywords_include", "keywords": ["river", "bridge"]}, "The bridge is old."),
    ({"kind": "keywords_exclude", "keywords": ["cat"]}, "My Cat sleeps."),
    ({"kind": "keyword_frequency", "keyword": "data", "relation": "at least", "num": 2}, "Database only once: data."),
    ({"kind": "letter_frequency", "letter": "z", "relation": "exactly", "num": 3}, "Zebras buzz loudly, zzz."),
    ({"kind": "capital_word_frequency", "relation": "at least", "num": 2}, "Only ONE capital word. I"),
    ({"kind": "json_format"}, '{"name": "x"} and some trailing text'),
    ({"kind": "json_format"}, "Here is the JSON: {\"a\": 1}"),
    ({"kind": "bullet_count", "num": 3}, "* one\n* two"),
    ({"kind": "highlighted_sections", "num": 2}, "Only *one* highlight and **bold**."),
    ({"kind": "title"}, "A Day at the Sea\nWe swam."),
    ({"kind": "quotation"}, '"Half quoted.'),
    ({"kind": "start_phrase", "phrase": "Dear team"}, "Hello team, dear team."),
    ({"kind": "end_phrase", "phrase": "Is there anything else I can help with?"},
     "Is there anything else I can help with? Bye."),
    ({"kind": "lowercase"}, "Mostly lowercase but One capital."),
    ({"kind": "uppercase"}, "ALMOST ALL CAPS but not."),
    ({"kind": "no_commas"}, "Yes, a comma."),
    ({"kind": "placeholders", "num": 2}, "Send it to [address] by Friday."),
    ({"kind": "numbered_sections", "marker": "Section", "num": 2}, "Section 1\nOnly one section."),
    ({"kind": "postscript", "marker": "P.S."}, "Best wishes. No postscript."),
    ({"kind": "postscript", "marker": "P.S."}, "Best wishes, see the P.S. below."),        # not a line start
    ({"kind": "lowercase"}, "12345 !!!"),                                   # nothing to be lowercase
    ({"kind": "nth_paragraph_first_word", "num": 2, "nth": 2, "first_word": "then"},
     "First we wait.\n\nAnd then we go."),
    ({"kind": "constrained_response"}, "My answer is probably."),
    ({"kind": "two_responses"}, "Cats are calm.\n******\nCats are calm."),
    ({"kind": "word_count", "relation": "less than", "num": 3}, "one two three"),
    ({"kind": "lowercase"}, "<think>still thinking and never done"),
]


@pytest.mark.parametrize("instruction,response", FOLLOWS)
def test_follows(instruction, response):
    ifeval.validate([instruction])
    assert ifeval.score(response, [instruction]) == 1.0


@pytest.mark.parametrize("instruction,response", DOES_NOT)
def test_does_not_follow(instruction, response):
    ifeval.validate([instruction])
    assert ifeval.score(response, [instruction]) == 0.0


def test_reward_is_the_fraction_followed():
    instructions = [{"kind": "lowercase"}, {"kind": "no_commas"}, {"kind": "title"},
                    {"kind": "word_count", "relation": "at most", "num": 4}]
    assert ifeval.score("hello, world", instructions) == 0.5    # lowercase, <= 4 words


def test_every_kind_is_exercised_and_there_are_at_least_15():
    used = {ins["kind"] for ins, _ in FOLLOWS} & {ins["kind"] for ins, _ in DOES_NOT}
    assert used == set(ifeval.CHECKS) and len(ifeval.CHECKS) >= 15


@pytest.mark.parametrize("bad,message", [
    ([], "non-empty list"),
    ([{"kind": "shout"}], "kind must be one of"),
    ([{"kind": "word_count", "num": 3}], "expected ['num', 'relation']"),
    ([{"kind": "word_count", "relation": "about", "num": 3}], "relation must be one of"),
    ([{"kind": "bullet_count", "num": -1}], "num must be an integer"),
    ([{"kind": "title", "extra": 1}], "parameters ['extra']"),
    ([{"kind": "keywords_include", "keywords": "cat"}], "keywords must be a non-empty list"),
    ([{"kind": "letter_frequency", "letter": "ab", "relation": "at least", "num": 1}], "letter must be one"),
    ([{"kind": "end_phrase", "phrase": "  "}], "phrase must be a non-empty string"),
])
def test_malformed_instructions_are_data_errors(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ifeval.validate(bad)
