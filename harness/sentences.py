"""A small built-in English sentence generator for the synthetic dataset.

Written for this project (templates and word lists below, not a copied corpus), so the embedded
data needs no download. Sentences look like the copy-task prompts of the real data: 3-8 everyday
words, sentence-initial capital, final punctuation ("I want to go home now."). Every word is in
the CMU dictionary (a test checks it), so each sentence has phoneme labels.

A template is text with `{slot}` references; `{slot?}` is left empty half of the time. A slot
option may hold several words. Deterministic for a given numpy Generator.
"""

import re

import numpy as np

from harness.errors import UserError
from harness.pronounce import words

MIN_WORDS, MAX_WORDS = 3, 8

SLOTS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "doctor", "nurse", "teacher", "neighbor",
               "friend", "brother", "sister", "mother", "father", "child", "driver", "farmer",
               "baker", "student", "artist", "cook"),
    "animal": ("dog", "cat", "bird", "horse", "cow", "duck", "rabbit", "puppy"),
    "adj_p": ("old", "young", "tall", "kind", "tired", "happy", "quiet", "busy", "little",
              "friendly"),
    "adj_t": ("old", "new", "small", "big", "red", "blue", "green", "short", "long", "heavy",
              "clean", "warm", "soft", "little", "nice", "brown", "empty"),
    "thing": ("letter", "book", "car", "chair", "table", "window", "door", "phone", "cup", "bag",
              "picture", "ball", "hat", "coat", "box", "key", "map", "lamp", "blanket", "pillow",
              "bottle", "plate", "shirt", "bicycle", "card", "radio"),
    "readable": ("letter", "book", "story", "note", "card", "map", "newspaper", "message",
                 "poem"),
    "v3s": ("finds", "wants", "needs", "likes", "carries", "holds", "buys", "sells", "cleans",
            "brings", "drops", "moves", "fixes", "paints", "takes", "keeps", "hides", "sees"),
    "det": ("the", "a", "my", "your", "this", "that", "our", "his", "her", "their"),
    "poss": ("my", "your", "our", "his", "her", "their"),
    "ask": ("can you", "could you", "will you", "would you"),
    "fetch": ("bring", "get", "make", "find", "buy", "pour"),
    "food": ("water", "coffee", "tea", "milk", "juice", "soup", "bread", "rice", "cheese",
             "fruit", "toast", "salad", "ice", "sugar", "chicken", "pasta"),
    "when": ("now", "later", "tonight", "tomorrow", "today", "soon", "right now",
             "this morning", "this evening", "after lunch"),
    "past_when": ("yesterday", "last night", "this morning", "today", "again", "last week"),
    "want_to": ("i want to", "i need to", "we want to", "we need to", "i would like to",
                "they want to", "she wants to", "he needs to", "you have to"),
    "activity": ("go home", "go outside", "go to bed", "go to sleep", "go to work",
                 "go to school", "go to the store", "go to the park", "stay home", "sit down",
                 "eat dinner", "eat lunch", "watch the news", "read a book", "call my mother",
                 "take a walk", "see the doctor", "rest", "talk", "leave"),
    "lets": ("go outside", "eat dinner", "watch a movie", "play a game", "take a walk",
             "read a story", "sing a song", "call your sister", "cook something",
             "clean the kitchen", "go for a drive", "plant some flowers"),
    "imp": ("open", "close", "bring", "move", "clean", "find", "fix", "take", "hold", "get",
            "check", "wash"),
    "where_q": ("where is", "have you seen", "did you find", "can you find", "who has",
                "who took"),
    "family": ("mother", "father", "sister", "brother", "friend", "neighbor", "doctor", "son",
               "daughter", "wife", "husband", "uncle", "aunt", "cousin"),
    "state": ("tired", "happy", "sick", "busy", "late", "here", "home", "hungry", "cold",
              "better", "asleep", "outside", "upstairs", "angry", "ready", "away"),
    "feel": ("i feel", "i am", "i'm", "we are", "you look", "she seems", "he feels"),
    "feeling": ("tired", "hungry", "thirsty", "cold", "warm", "sick", "better", "fine",
                "great", "sad", "happy", "sleepy", "bored", "ready", "nervous", "worried"),
    "v_intr": ("sleeps", "runs", "plays", "sits", "waits", "eats", "hides", "rests"),
    "place": ("outside", "inside", "upstairs", "in the garden", "by the door",
              "under the table", "on the bed", "near the window", "all day", "in the sun"),
    "room": ("kitchen", "garden", "garage", "house", "bedroom", "bathroom", "car", "yard",
             "office", "porch", "basement"),
    "verb_room": ("clean", "paint", "check", "lock", "fix", "sweep", "open", "close"),
    "we_will": ("we will", "i will", "they will", "you can", "we should", "let me"),
    "past": ("found", "lost", "dropped", "moved", "fixed", "cleaned", "washed", "sold",
             "bought", "left", "forgot", "broke"),
    "pron": ("i", "she", "he", "we", "they", "you"),
    "gift": ("gift", "card", "flowers", "book", "dinner", "lunch", "help", "coffee", "ride",
             "letter", "visit", "music"),
    "how_q": ("how was", "did you enjoy", "how is"),
    "event": ("day", "trip", "weekend", "dinner", "lunch", "class", "visit", "week", "night",
              "morning", "walk", "flight", "party", "game"),
    "very": ("very", "so", "too", "really"),
    "weather": ("cold", "warm", "hot", "sunny", "raining", "windy", "cloudy", "dark", "late",
                "quiet", "early", "snowing"),
    "weather_when": ("today", "tonight", "outside", "now", "this morning", "again"),
    "like": ("like", "love", "need", "want", "have", "see", "don't like", "don't need",
             "don't want", "can't find", "can't see", "lost"),
    "want_some": ("do you want", "would you like", "do you need", "can i have", "may i have",
                  "i would like", "i need"),
    "loc": ("on the table", "in the car", "under the bed", "by the door", "in the kitchen",
            "on the floor", "in my bag", "near the window", "upstairs", "outside"),
}

TEMPLATES: tuple[str, ...] = (
    "the {adj_p?} {person} {v3s} {det} {adj_t?} {thing}.",
    "the {adj_p?} {person} reads {det} {adj_t?} {readable}.",
    "{ask} {fetch} me some {food} {when?}?",
    "{want_to} {activity} {when?}.",
    "please {imp} the {adj_t?} {thing} {when?}.",
    "{where_q} {poss} {adj_t?} {thing}?",
    "{poss} {family} is {state} {when?}.",
    "{feel} {very?} {feeling} {when?}.",
    "the {adj_t?} {animal} {v_intr} {place}.",
    "{we_will} {verb_room} the {room} {when?}.",
    "{pron} {past} {poss} {thing} {past_when?}.",
    "thank you for the {adj_t?} {gift}.",
    "{how_q} your {event}?",
    "tell me about your {event}.",
    "it is {very?} {weather} {weather_when?}.",
    "i {like} {det} {adj_t?} {thing}.",
    "{want_some} some {food} {when?}?",
    "the {adj_t?} {thing} is {loc}.",
    "let's {lets} {when?}.",
)

_SLOT = re.compile(r"\{(\w+)(\??)\}")
_VOWEL_LETTERS = "aeiou"


def _fill(template: str, rng: np.random.Generator) -> str:
    """Replace each slot, left to right, with one of its options (optional slots: 50% empty)."""
    def pick(match: re.Match) -> str:
        name, optional = match.groups()
        if optional and rng.random() < 0.5:
            return ""
        options = SLOTS[name]
        return options[rng.integers(len(options))]
    return _SLOT.sub(pick, template)


def _finish(text: str) -> str:
    """Lowercase filled template -> label: a/an agreement, capital I, initial capital."""
    body, punct = text[:-1].split(), text[-1]
    body = ["an" if w == "a" and nxt[0] in _VOWEL_LETTERS else w
            for w, nxt in zip(body, body[1:] + ["x"])]
    body = ["I" + w[1:] if w == "i" or w.startswith("i'") else w for w in body]
    sentence = " ".join(body)
    return sentence[0].upper() + sentence[1:] + punct


def generate_sentence(rng: np.random.Generator) -> str:
    """One sentence label of MIN_WORDS..MAX_WORDS words (templates that run long are redrawn)."""
    while True:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        sentence = _finish(_fill(template, rng))
        if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
            return sentence


def sentence_key(sentence: str) -> str:
    """What makes two sentences 'the same' for split disjointness: the words, not case or
    punctuation ("Open the door." and "open the door!" must not land in train and val)."""
    return " ".join(words(sentence))


def unique_sentences(rng: np.random.Generator, n: int) -> list[str]:
    """n sentences with distinct `sentence_key`, in the order drawn."""
    found: dict[str, str] = {}
    for _ in range(50 * n + 1000):
        if len(found) == n:
            break
        sentence = generate_sentence(rng)
        found.setdefault(sentence_key(sentence), sentence)
    if len(found) < n:
        raise UserError(f"the built-in sentence generator ran out of distinct sentences at "
                        f"{len(found)} of {n}; use fewer trials or a corpus file (--corpus)")
    return list(found.values())


def vocabulary() -> set[str]:
    """Every word the generator can produce (lowercase), for the dictionary check."""
    texts = [*TEMPLATES, *(option for options in SLOTS.values() for option in options), "an"]
    return {w for text in texts for w in words(_SLOT.sub(" ", text))}
