"""Write the small bundled datasets and tokenizer under `recipes/data/` (offline quickstart and example recipes).

    python scripts/make_bundled_data.py [--out recipes/data] [--seed 1234]

Everything is generated here from templates and word lists written for this project, so it carries the project's
licence (Apache-2.0) and contains no third-party text. The output is deterministic: the same seed gives
byte-identical files on every run.

    quickstart/train.txt, quickstart/validation.txt  synthetic children's stories, one per line
    quickstart/tokenizer/                            byte-level BPE (vocab 2048) trained on train.txt
    alpaca_sample.jsonl                              {"instruction", "input", "output"}
    classification_sample.csv                        text,label (positive / negative / neutral)
    classification_sample_validation.csv             text,label, disjoint from the training rows
    seq2seq_sample.jsonl                             {"source", "target"}
    chat_sample.jsonl                                {"messages": [{"role", "content"}, ...]}
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN_BYTES = 1_800_000  # quickstart/train.txt target size
VALIDATION_BYTES = 100_000  # quickstart/validation.txt target size
VOCAB_SIZE = 2048
EOS = "<|endoftext|>"
PAD = "<pad>"

# --------------------------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------------------------


class Place:
    def __init__(self, name: str, at: str, live: str, spots: list[str], acts: list[str]):
        self.name, self.at, self.live, self.spots, self.acts = name, at, live, spots, acts


# fmt: off
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Oscar", "Hugo", "Noah", "Jake", "Milo", "Theo",
        "Pip", "Ollie", "Dan", "Lucas", "Henry", "Alfie", "Billy", "Charlie", "Eddie", "Felix", "George", "Harry",
        "Jasper", "Kai", "Louis", "Ned", "Otto", "Peter", "Rex", "Toby", "Walter", "Arlo", "Bruno", "Rory", "Sid",
        "Teddy"]
GIRLS = ["Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Ruby", "Ella", "Rosa", "Amy", "Kate", "Nora", "Ivy",
         "Daisy", "Molly", "Sara", "Poppy", "Alice", "Bella", "Clara", "Dora", "Elsie", "Fern", "Grace", "Hazel",
         "Iris", "Jenny", "Lola", "Maisie", "Nell", "Olive", "Penny", "Rita", "Stella", "Tilly", "Violet", "Willa",
         "Hannah", "Maya"]
ANIMALS = ["fox", "cat", "dog", "rabbit", "bunny", "bear", "mouse", "bird", "duck", "frog", "owl", "elephant", "pig",
           "lion", "squirrel", "turtle", "puppy", "kitten", "hedgehog", "goat", "deer", "tiger", "sheep", "horse",
           "pony", "cow", "chick", "hen", "goose", "otter", "badger", "beaver", "raccoon", "monkey", "giraffe",
           "zebra", "penguin", "panda", "koala", "kangaroo", "donkey", "lamb", "wolf", "bee", "butterfly", "snail",
           "ladybug", "dragon", "unicorn", "dinosaur"]
HERO_ADJ = ["little", "small", "happy", "brave", "curious", "kind", "shy", "young", "silly", "clever", "friendly",
            "tiny", "playful", "gentle", "cheerful", "busy", "cute", "sleepy", "smart", "bouncy", "fluffy", "lively",
            "careful", "polite", "jolly", "chatty", "proud", "sweet"]
FRIEND_ADJ = ["big", "old", "wise", "kind", "funny", "little", "friendly", "happy", "quiet", "fast", "tall", "clever",
              "gentle", "helpful", "strong", "jolly", "grumpy", "noisy"]
PARENTS = {"mom": "she", "dad": "he", "grandma": "she", "grandpa": "he", "aunt": "she", "uncle": "he"}


PLACES = [
    Place("park", "in the park", "near a big park", ["under the bench", "behind a tree", "near the swings",
                                                     "in the grass"],
          ["play on the swings", "run in the grass", "slide down the slide", "feed the ducks"]),
    Place("forest", "in the forest", "in a deep green forest", ["under a big tree", "near an old log",
                                                                "behind a bush", "under some leaves"],
          ["climb trees", "pick berries", "listen to the birds", "collect pine cones"]),
    Place("garden", "in the garden", "in a house with a big garden", ["under a flower", "behind the fence",
                                                                      "next to the pond", "in the soft dirt"],
          ["water the flowers", "watch the bees", "dig in the dirt", "plant seeds"]),
    Place("farm", "on the farm", "on a busy farm", ["in the hay", "behind the barn", "near the fence",
                                                    "by the old tractor"],
          ["feed the chickens", "play in the hay", "ride on the tractor", "collect eggs"]),
    Place("beach", "at the beach", "in a little town by the sea", ["in the sand", "near the water", "under a rock",
                                                                   "by a big shell"],
          ["build sand castles", "splash in the waves", "look for shells", "watch the boats"]),
    Place("meadow", "in the meadow", "near a sunny meadow", ["in the tall grass", "near a flower", "under a stone",
                                                             "by the little stream"],
          ["chase butterflies", "pick flowers", "roll down the hill", "make flower crowns"]),
    Place("pond", "by the pond", "next to a quiet pond", ["near the water", "under a lily pad", "in the mud",
                                                          "behind the reeds"],
          ["watch the fish", "throw little stones", "look at the ducks", "catch tadpoles"]),
    Place("village", "in the village", "in a small village", ["near the well", "under a cart",
                                                              "by the baker's shop", "behind a wall"],
          ["visit the baker", "play with the other children", "walk to the market", "ring the big bell"]),
    Place("hill", "on the hill", "at the bottom of a green hill", ["behind a rock", "in the grass",
                                                                   "under a little tree", "near the top"],
          ["fly kites", "look at the town below", "roll down the grass", "watch the sunset"]),
    Place("river", "by the river", "in a little house by the river", ["under the bridge", "near the water",
                                                                      "behind a big stone", "in the reeds"],
          ["watch the boats", "skip stones", "listen to the water", "fish with a stick"]),
    Place("mountain", "on the mountain", "high up on a mountain", ["behind a rock", "in the snow",
                                                                   "near a pine tree", "under a bush"],
          ["climb rocks", "play in the snow", "watch the eagles", "look at the clouds below"]),
    Place("zoo", "at the zoo", "near the big zoo", ["near the gate", "under a bench", "by the monkey house",
                                                    "behind a tree"],
          ["watch the monkeys", "feed the goats", "look at the giraffes", "visit the penguins"]),
    Place("school", "at school", "near a little school", ["under a desk", "in the playground", "behind the door",
                                                          "near the sandbox"],
          ["learn new words", "paint pictures", "sing with the class", "play in the playground"]),
    Place("city", "in the city", "in a tall building in the city", ["near a shop", "under a bench",
                                                                    "by the fountain", "next to a lamp post"],
          ["ride the bus", "watch the people", "visit the library", "eat ice cream by the fountain"]),
    Place("island", "on the island", "on a small island", ["under a palm tree", "in the sand", "near the rocks",
                                                           "by the little boat"],
          ["swim in the sea", "climb palm trees", "look for crabs", "watch the waves"]),
    Place("castle", "in the old castle", "in an old castle on a hill", ["behind a curtain", "under the stairs",
                                                                        "in a big chest", "near the tower"],
          ["climb the tower", "explore the long halls", "play knights", "look out of the high windows"]),
]
ACTIVITIES = ["play with {his} ball", "sing happy songs", "draw pictures", "look at the clouds", "jump in puddles",
              "run and jump", "play games with {his} friends", "read books", "dance", "look at the stars at night",
              "build things with blocks", "play outside", "tell funny jokes", "explore new places", "paint",
              "ride {his} bike", "play the drum", "bake cookies", "make paper boats", "count the birds",
              "play in the mud", "help {his} {parent}", "climb on rocks", "collect pretty stones", "whistle",
              "blow bubbles", "skip and hop", "play pretend", "listen to stories"]
TOYS = ["ball", "kite", "teddy bear", "toy car", "hat", "drum", "doll", "toy boat", "blanket", "book", "scarf",
        "toy train", "yo-yo", "music box", "robot", "puzzle", "crayon", "whistle", "balloon", "toy plane", "rocket",
        "spinning top", "puppet", "bucket", "umbrella"]
FOUND = ["shell", "key", "rock", "feather", "box", "coin", "ring", "map", "stone", "button", "bell", "marble",
         "leaf", "whistle", "egg", "bottle", "glove", "crown", "acorn", "letter", "star", "jewel", "lamp", "basket"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "brown", "gold", "silver",
          "gray"]
OBJ_ADJ = ["shiny", "pretty", "soft", "old", "little", "big", "round", "smooth", "funny", "sparkly", "strange",
           "tiny", "heavy", "bright", "fuzzy", "striped", "spotted", "magic", "wooden", "golden"]
FOODS = ["red apple", "big cookie", "piece of cake", "sandwich", "banana", "bowl of berries", "carrot",
         "piece of bread", "orange", "muffin", "pear", "slice of pie", "bowl of soup", "peach", "cupcake",
         "bag of nuts", "piece of cheese", "plum", "slice of watermelon", "honey cake", "jam sandwich",
         "bunch of grapes"]
NEG_FEELINGS = ["sad", "lonely", "scared", "worried", "upset", "grumpy", "nervous"]
# (base form, past form, what it was) for the "be brave" plot
BRAVE_GOALS = [
    ("climb the tall tree", "climbed the tall tree", "The tree was very tall"),
    ("swim across the pond", "swam across the pond", "The water looked deep"),
    ("ride {his} new bike", "rode {his} new bike", "The bike was fast and wobbly"),
    ("go down the big slide", "went down the big slide", "The slide was very high"),
    ("jump over the little stream", "jumped over the little stream", "The stream looked wide"),
    ("sing in front of everyone", "sang in front of everyone", "There were so many people"),
    ("walk across the old bridge", "walked across the old bridge", "The bridge made creaky sounds"),
    ("go into the dark cave", "went into the dark cave", "The cave was dark and quiet"),
    ("climb to the top of the hill", "climbed to the top of the hill", "The hill was very steep"),
    ("sleep without a light", "slept without a light", "The room was very dark"),
    ("dive into the cold lake", "dove into the cold lake", "The lake was cold and very still"),
    ("ride the big pony", "rode the big pony", "The pony was much bigger than {him}"),
    ("read a poem to the class", "read a poem to the class", "Everyone would be looking"),
    ("pet the big dog next door", "petted the big dog next door", "The dog had very big teeth"),
]
# (base, past, the gift as a noun phrase) for the gift plot
GIFTS = [
    ("draw a picture", "drew a beautiful picture", "picture"),
    ("pick some flowers", "picked the prettiest flowers", "flowers"),
    ("make a card", "made a card with a big heart on it", "card"),
    ("bake a small cake", "baked a small cake", "cake"),
    ("write a little song", "wrote a little song", "song"),
    ("make a necklace", "made a necklace out of shiny beads", "necklace"),
    ("paint a stone", "painted a stone with bright colors", "stone"),
    ("knit a scarf", "knitted a long warm scarf", "scarf"),
    ("build a bird house", "built a little bird house", "bird house"),
    ("make a paper crown", "made a golden paper crown", "crown"),
]
SHELTERS = ["under a big tree", "into a little cave", "back home", "under the roof of an old barn",
            "into a hollow log", "under a wide bridge", "into a little shed"]
WEATHER = [
    ("dark clouds came and it started to rain", "the rain stopped", "they saw a big rainbow in the sky"),
    ("a strong wind began to blow", "the wind stopped", "the sun came out again"),
    ("it started to snow", "the snow stopped", "everything was white and sparkly"),
    ("there was a loud clap of thunder", "the storm went away", "the birds began to sing again"),
    ("a thick fog rolled in", "the fog lifted", "they could see the whole valley"),
    ("big drops of hail fell from the sky", "the hail stopped", "the air smelled fresh and clean"),
]
HIDE_SPOTS = ["behind a big tree", "under a pile of leaves", "inside an empty box", "behind the curtain",
              "under the table", "behind a bush", "in the tall grass", "inside a big basket", "under a blanket"]
LOOK_SPOTS = ["under the bed", "behind the door", "in the toy box", "under the chair", "in the kitchen",
              "behind the sofa", "near the window", "in the garden", "in the closet", "under the pillow"]
SEEDS = [("sunflower", "a tall yellow sunflower"), ("apple tree", "a little apple tree"),
         ("pumpkin", "a big orange pumpkin"), ("rose", "a beautiful red rose"), ("bean", "a tall bean plant"),
         ("tomato", "a plant with round red tomatoes"), ("daisy", "a field of white daisies"),
         ("strawberry", "a plant with sweet strawberries")]
BAKES = [("cookies", "flour, butter and sugar"), ("bread", "flour, water and salt"),
         ("an apple pie", "apples, flour and sugar"), ("pancakes", "eggs, milk and flour"),
         ("a chocolate cake", "chocolate, eggs and sugar"), ("muffins", "berries, flour and milk")]
TRIPS = [  # where, where they are once there, how they travel, what they see
    ("the zoo", "at the zoo", "bus", ["a tall giraffe", "a sleepy lion", "two funny monkeys", "a big gray elephant"]),
    ("the sea", "at the sea", "train", ["white boats", "big waves", "a red lighthouse", "noisy seagulls"]),
    ("the mountains", "in the mountains", "car", ["snowy tops", "a blue lake", "a wild goat", "tall pine trees"]),
    ("the city", "in the city", "train", ["tall buildings", "a big fountain", "a busy market", "a red bus"]),
    ("the farm", "on the farm", "bus", ["a pink pig", "a brown cow", "little yellow chicks", "a big tractor"]),
    ("the museum", "at the museum", "bus", ["an old dinosaur", "a shiny rocket", "old paintings", "a huge whale"]),
    ("the island", "on the island", "boat", ["palm trees", "a sleepy turtle", "orange crabs", "a little lighthouse"]),
]
PET_NAMES = ["Spot", "Fluffy", "Button", "Pepper", "Sunny", "Biscuit", "Coco", "Patch", "Whiskers", "Bubbles",
             "Peanut", "Ziggy", "Muffin", "Pebble", "Noodle"]
PETS = ["puppy", "kitten", "bunny", "hamster", "goldfish", "parrot", "turtle", "chick"]
RACE_GOALS = ["the big oak tree", "the old gate", "the top of the hill", "the red barn", "the river",
              "the end of the road", "the little bridge"]
NIGHT_THINGS = [("moon", "big and round"), ("stars", "bright and twinkly"), ("moon", "thin like a smile"),
                ("stars", "like tiny lights"), ("fireflies", "glowing in the dark")]
FEELINGS_STEADY = ["happy", "proud", "glad", "excited", "thankful", "calm"]
# fmt: on


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


# --------------------------------------------------------------------------------------------------------------
# Stories
# --------------------------------------------------------------------------------------------------------------


class Character:
    """A story character: name, kind ("girl", "boy" or an animal), pronouns and a description."""

    def __init__(self, rng: random.Random, adjectives: list[str], avoid: tuple[str, ...] = (), kind: str = ""):
        girl = rng.random() < 0.5
        self.name = rng.choice([n for n in (GIRLS if girl else BOYS) if n not in avoid])
        if not kind:
            kind = rng.choice(ANIMALS) if rng.random() < 0.6 else ("girl" if girl else "boy")
        self.kind = kind
        self.adj = rng.choice(adjectives)
        self.he, self.his, self.him = ("she", "her", "her") if girl else ("he", "his", "him")
        self.human = kind in ("girl", "boy")

    def a_desc(self) -> str:
        return article(f"{self.adj} {self.kind}")


# A plot is a list of units. A unit is one sentence (with its line of speech, if any) written as alternatives
# separated by " | "; a leading "? " marks it optional. Slots like {name} or {his} are filled from the story's dict.


def story(rng: random.Random, kind: str = "") -> str:
    """One story of 4 to 8 units: an opening, maybe what the hero likes, then a plot."""
    hero = Character(rng, HERO_ADJ, kind=kind)
    pal = Character(rng, FRIEND_ADJ, avoid=(hero.name,))
    place = rng.choice(PLACES)
    parent = rng.choice(list(PARENTS))
    phe = PARENTS[parent]
    f = {
        "name": hero.name, "he": hero.he, "He": cap(hero.he), "his": hero.his, "His": cap(hero.his),
        "him": hero.him, "desc": hero.a_desc(), "kind": hero.kind,
        "friend": pal.name, "fhe": pal.he, "fHe": cap(pal.he), "fhis": pal.his, "fhim": pal.him,
        "fdesc": pal.a_desc(), "fkind": pal.kind,
        "place": place.name, "at_place": place.at, "live": place.live, "parent": parent, "phe": phe,
        "pHe": cap(phe), "phim": "her" if phe == "she" else "him", "phis": "her" if phe == "she" else "his",
    }  # fmt: skip
    intros = ["{his} friend {friend}", "{his} best friend {friend}"]
    if not pal.human:
        intros.append("{his} friend {friend} the {fkind}")
    f["friend_intro"] = rng.choice(intros).format(**f)

    opening = rng.choice([
        ["Once upon a time, there was {desc} named {name}."],
        ["Once upon a time, there was {desc} named {name}.", "{He} lived {live}."],
        ["Once upon a time, {desc} named {name} lived {live}."],
        ["There once was {desc} called {name}."],
        ["{name} was {desc} who lived {live}."],
        ["Once there was {desc} named {name}.", "{He} lived {live} with {his} {parent}."],
        ["Long ago, {live}, there lived {desc} named {name}."],
    ])  # fmt: skip
    acts = place.acts + ACTIVITIES if any("{live}" in s for s in opening) else ACTIVITIES
    f["activity"] = rng.choice(acts).format(**f)
    liking = (
        "? {name} liked to {activity}. | {He} loved to {activity}. | Every day, {name} would {activity}. "
        "| {name}'s favorite thing was to {activity}. | More than anything, {name} loved to {activity}."
    )
    units = []  # (sentence, optional)
    for unit in opening + [liking] + rng.choice(PLOTS)(rng, f, place):
        optional = unit.startswith("? ")
        units.append((rng.choice(unit.removeprefix("? ").split(" | ")), optional))
    keep = [u for u in units if not u[1] or rng.random() < 0.7]
    if len(keep) < 4:
        keep = units
    while len(keep) > 8:
        keep.pop(rng.choice([i for i, (_, optional) in enumerate(keep) if optional]))
    assert len(keep) >= 4, keep
    return " ".join(cap(s.format(**f)) for s, _ in keep)


def plot_lost(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["toy"] = toy = rng.choice(TOYS)
    f["a_toy"] = article(f"{rng.choice(COLORS + OBJ_ADJ)} {toy}")
    f["look1"], f["look2"], f["found_at"] = rng.sample(LOOK_SPOTS + place.spots, 3)
    f["neg"] = rng.choice(["sad", "upset", "worried"])
    return [
        "{name} had {a_toy}. | {His} favorite toy was {a_toy}.",
        "? {He} took it everywhere. | {He} loved it very much. | It was {his} best friend.",
        "One day, {name} could not find {his} {toy}. | One morning, the {toy} was gone! | But one day, {he} lost it.",
        "? {He} looked {look1} and {look2}, but it was not there. | {He} looked {look1}. | {He} looked everywhere.",
        "? {name} felt very {neg}. | {name} started to cry. | {He} was very {neg}.",
        "Then {friend_intro} came to help. | Then {friend_intro} saw {him} and asked what was wrong.",
        '? "Don\'t worry, I will help you look," said {friend}.',
        "At last, {friend} found the {toy} {found_at}. | They found the {toy} {found_at}! "
        "| Together they looked {found_at}, and there it was!",
        '{name} was so happy. "Thank you!" {he} said, and gave {friend} a big hug. '
        "| {name} hugged {his} {toy} and smiled. | From that day on, {name} kept the {toy} safe.",
    ]


def plot_found(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["thing"] = rng.choice(FOUND)
    f["a_thing"] = article(f"{rng.choice(COLORS + OBJ_ADJ)} {f['thing']}")
    f["spot"] = rng.choice(place.spots)
    f["feel"] = rng.choice(["surprised", "excited", "curious"])
    owner = rng.choice([a for a in ANIMALS if a != f["kind"]])
    f["owner"] = article(f"{rng.choice(['old', 'little', 'sad', 'worried'])} {owner}")
    units = [
        "? One sunny day, {name} was playing {at_place}. | One day, {name} went to play {at_place}. "
        "| One morning, {name} went for a walk {at_place}.",
        "Suddenly, {he} saw something {spot}. | {He} saw something shiny {spot}.",
        "It was {a_thing}!",
        '? {name} was very {feel}. "What is this?" {he} asked.',
    ]
    if rng.random() < 0.5:
        return units + [
            "{He} ran to show it to {friend_intro}. | {He} showed it to {friend_intro}.",
            '? "Wow, it is so pretty!" said {friend}. | {friend} smiled. "Can I see it too?"',
            "{name} and {friend} played with the {thing} all day. | They looked at the {thing} together and laughed. "
            "| {name} let {friend} hold the {thing}, and they were both happy.",
            "? Sharing made the day even better. | It was a very good day.",
        ]
    return units + [
        '{He} thought, "Maybe someone lost it."',
        '{He} asked everyone {at_place}. At last, {owner} said, "That is mine! Thank you so much!"',
        "{name} felt proud because {he} did the right thing. | {name} smiled. It felt good to help.",
    ]


def plot_brave(rng: random.Random, f: dict, place: Place) -> list[str]:
    goal, past, what = rng.choice(BRAVE_GOALS)
    f["goal"], f["goal_past"], f["what"] = goal.format(**f), past.format(**f), what.format(**f)
    f["helper"] = rng.choice(["{His} {parent}", "{His} friend {friend}"]).format(**f)
    return [
        "One day, {name} wanted to {goal}. | {name} wanted to {goal} more than anything.",
        "But {he} was scared. {what}.",
        '? "What if I fall?" {he} asked. | "I can\'t do it," {he} said. | {name} felt {his} legs shake.',
        '{helper} said, "Be brave, {name}. You can do it!"',
        "? {name} took a deep breath. | {name} closed {his} eyes and counted to three.",
        "Slowly, {he} {goal_past}. | Then {he} {goal_past}!",
        "{He} did it! {name} felt very proud. | {name} was so proud of {him}self.",
        "? Now {name} is not scared anymore. | From that day on, {name} was never scared again.",
    ]


def plot_help(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["toy"] = rng.choice(TOYS)
    f["food"] = rng.choice(FOODS)
    f["fix"] = rng.choice(["some tape", "a bit of glue", "a piece of string", "a little nail"])
    problem, solve = rng.choice([
        ('"My {toy} is stuck in the tree," said {friend}.',
         "{name} found a long stick and got the {toy} down. | {name} climbed up and got the {toy}."),
        ('"I can\'t find my way home," said {friend}.',
         "{name} knew the way. {He} walked with {friend} to {fhis} house."),
        ('"I am so hungry," said {friend}.', "{name} gave {friend} {his} {food}."),
        ('"My {toy} is broken," said {friend}.', "{name} helped {fhim} fix it with {fix}."),
        ('"I hurt my leg," said {friend}.', "{name} helped {fhim} walk home slowly."),
    ])  # fmt: skip
    return [
        "One day, {name} saw {fdesc} named {friend} {at_place}. | One day, {name} met {fdesc} named {friend}.",
        "{fHe} was crying. | {fHe} looked very sad.",
        '? "Why are you sad?" asked {name}.',
        problem,
        solve,
        '"Thank you, {name}!" said {friend}. {fHe} smiled a big smile. | {friend} was very happy and said thank you.',
        "? From that day on, {name} and {friend} were best friends. | Helping others made {name} feel warm inside.",
    ]


def plot_weather(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["start"], f["stop"], f["after"] = rng.choice(WEATHER)
    f["shelter"] = rng.choice(SHELTERS)
    return [
        "One day, {name} and {friend} went to play {at_place}. | One day, {name} went to play {at_place} with "
        "{friend_intro}.",
        "? The sun was shining and the sky was blue. | It was a warm and sunny day.",
        "Suddenly, {start}.",
        "{name} and {friend} ran {shelter}.",
        "? They waited and told each other stories. | They were wet and cold, but they laughed. "
        "| {friend} was scared, so {name} held {fhis} hand.",
        "Soon {stop} and {after}.",
        '? "Look!" said {friend}. "It is so beautiful!" | It was the best day ever.',
    ]


def plot_gift(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["make"], f["made"], f["gift"] = rng.choice(GIFTS)
    return [
        "Tomorrow was {his} {parent}'s birthday. | {name}'s {parent} had been very tired all week.",
        "{name} wanted to give {phim} a gift, but {he} had no money.",
        "Then {he} had an idea! {He} would {make}.",
        "{He} worked hard all day and {made}. | {name} {made}.",
        "When {his} {parent} saw the {gift}, {phe} smiled a big smile.",
        '? "This is the best gift ever!" {phe} said, and gave {name} a hug.',
        "? {name} felt warm and happy inside. | {name} learned that the best gifts come from the heart.",
    ]


def plot_share(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["food"] = food = rng.choice(FOODS)
    f["a_food"] = article(food)
    f["feel"] = rng.choice(["hungry", "sad", "lonely"])
    return [
        "{name} had {a_food} for lunch.",
        "? {He} sat down {at_place} to eat it.",
        "Then {he} saw {fdesc} named {friend}. {fHe} looked {feel}.",
        "? {name} thought for a moment.",
        "Then {he} shared {his} {food} with {friend}.",
        '"You are very kind," said {friend}. | {friend} smiled and said, "Thank you!"',
        "? The {food} tasted even better when they shared it. | {name} learned that sharing makes everyone happy. "
        "| After lunch, they played together until the sun went down.",
    ]


def plot_hide(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["hide"] = rng.choice(HIDE_SPOTS + place.spots)
    f["n"] = rng.choice(["ten", "twenty", "five", "fifty"])
    return [
        "One day, {name} and {friend} played hide and seek {at_place}. "
        "| {name} liked to play hide and seek with {friend_intro}.",
        "{friend} closed {fhis} eyes and counted to {n}.",
        "{name} hid {hide}.",
        "{friend} looked and looked, but {fhe} could not find {him}.",
        '? Then {name} sneezed! "Achoo!" | Then {name} started to giggle.',
        '"I found you!" said {friend}.',
        "? They played until the sun went down. | Then it was {name}'s turn to count.",
    ]


def plot_new_friend(rng: random.Random, f: dict, place: Place) -> list[str]:
    return [
        "{name} had no friends to play with. | {name} was new {at_place} and had no friends.",
        "? {He} felt lonely.",
        "One day, {he} saw {fdesc} named {friend} sitting all alone.",
        '"Hello, my name is {name}. Do you want to play?" {he} asked.',
        '{friend} smiled. "Yes, please!" {fhe} said.',
        "They played together all afternoon. | They ran and laughed until it was time to go home.",
        "? Now {name} had a new best friend.",
    ]


def plot_seed(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["seed"], f["grown"] = rng.choice(SEEDS)
    f["days"] = rng.choice(["many days", "a whole week", "two weeks", "a long time"])
    return [
        "One day, {name} found a little {seed} seed. | {His} {parent} gave {him} a tiny {seed} seed.",
        "{He} planted it in the ground and gave it some water.",
        "? Every morning, {name} came to look at it. | Every day, {he} sang to the seed.",
        "? For {days}, nothing happened, and {name} felt a little sad.",
        "Then one morning, {he} saw a tiny green leaf!",
        "The seed grew and grew, and soon it was {grown}.",
        '{name} was so proud. "I grew it myself!" {he} said. | {name} learned that good things take time.',
    ]


def plot_bake(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["bake"], f["stuff"] = rng.choice(BAKES)
    f["who"] = rng.choice(["{friend}", "the neighbors", "all {his} friends", "the old lady next door"]).format(**f)
    return [
        "One rainy day, {name} and {his} {parent} wanted to bake {bake}. "
        "| One morning, {name} helped {his} {parent} bake {bake}.",
        "? They needed {stuff}.",
        "{name} mixed everything in a big bowl.",
        "? Oops! Some flour fell on {his} nose, and they both laughed. "
        "| {He} stirred and stirred until {his} arm was tired.",
        "Soon the kitchen smelled sweet and warm.",
        "When it was ready, they shared it with {who}.",
        '? "Yum! This is so good!" everyone said. | Everyone said it was the best they ever had.',
        "? {name} smiled. Baking with {his} {parent} was the best.",
    ]


def plot_race(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["goal"] = rng.choice(RACE_GOALS)
    return [
        "One day, {name} had a race to {goal} with {friend_intro}.",
        '? "Ready, set, go!" shouted {name}.',
        "{friend} was very fast, and soon {fhe} was far ahead.",
        "{name} was tired, but {he} did not give up. | {name} fell down, but {he} got up again.",
        "At the end, {friend} won the race. | At the end, they both got there at the same time.",
        '? "You did very well," said {friend}, and gave {name} a high five.',
        "? {name} learned that having fun is more important than winning.",
    ]


def plot_night(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["sky"], f["looked"] = rng.choice(NIGHT_THINGS)
    f["wish"] = rng.choice(
        ["a new friend", "a red bike", "a sunny day tomorrow", "a puppy", "wings to fly like a bird", "a big snow day"]
    )
    return [
        "One night, {name} could not sleep.",
        "{He} looked out of the window and saw the {sky}.",
        "? It was {looked}." if f["sky"] == "moon" else "? They were {looked}.",
        "{name} closed {his} eyes and made a wish for {wish}.",
        "Then {his} {parent} came in and sat on the bed.",
        "{pHe} told {name} a quiet story. | {pHe} sang a soft song.",
        "Soon {name} fell fast asleep with a smile on {his} face.",
    ]


def plot_pet(rng: random.Random, f: dict, place: Place) -> list[str]:
    f["pet"] = rng.choice(PETS)
    f["petname"] = rng.choice(PET_NAMES)
    return [
        "{name} wanted a pet more than anything.",
        "One day, {his} {parent} came home with a little box.",
        "Inside the box was a tiny {pet}!",
        "{name} called the {pet} {petname}.",
        "? {He} fed {petname} every morning and gave {petname} fresh water. "
        "| {He} took good care of {petname} every day.",
        "? {petname} liked to sleep next to {name} at night. | {name} and {petname} played together all the time.",
        "{name} loved {petname} very much.",
    ]


def plot_trip(rng: random.Random, f: dict, place: Place) -> list[str]:
    where, at_where, how, sights = rng.choice(TRIPS)
    f["where"], f["At_where"], f["how"] = where, cap(at_where), how
    f["s1"], f["s2"] = rng.sample(sights, 2)
    return [
        "One day, {name} and {his} {parent} went on a trip to {where}.",
        "? They went by {how}.",
        "? {name} looked out of the window the whole way.",
        "{At_where}, they saw {s1} and {s2}.",
        '? "Look at that!" said {name}, pointing. | {name} had never seen anything like it.',
        "They had a picnic and ate sandwiches in the sun.",
        "On the way home, {name} fell asleep.",
        "? {He} dreamed about {s1} all night.",
    ]


PLOTS: list[Callable[[random.Random, dict, Place], list[str]]] = [
    plot_lost, plot_found, plot_brave, plot_help, plot_weather, plot_gift, plot_share, plot_hide, plot_new_friend,
    plot_seed, plot_bake, plot_race, plot_night, plot_pet, plot_trip,
]  # fmt: skip


def stories(seed: int, target_bytes: int, exclude: set[str] = frozenset()) -> list[str]:
    rng = random.Random(seed)
    seen, lines, size = set(), [], 0
    while size < target_bytes:
        s = story(rng)
        if s in seen or s in exclude:
            continue
        seen.add(s)
        lines.append(s)
        size += len(s) + 1
    return lines


# --------------------------------------------------------------------------------------------------------------
# Instruction / classification / seq2seq / chat samples
# --------------------------------------------------------------------------------------------------------------

# fmt: off
PLURALS = [("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("bus", "buses"), ("baby", "babies"),
           ("city", "cities"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("child", "children"),
           ("mouse", "mice"), ("foot", "feet"), ("tooth", "teeth"), ("man", "men"), ("woman", "women"),
           ("sheep", "sheep"), ("fish", "fish"), ("goose", "geese"), ("apple", "apples"), ("tree", "trees"),
           ("bird", "birds"), ("house", "houses"), ("dish", "dishes"), ("church", "churches"), ("toy", "toys"),
           ("day", "days"), ("story", "stories"), ("potato", "potatoes"), ("glass", "glasses"), ("fox", "foxes"),
           ("person", "people"), ("shelf", "shelves"), ("book", "books"), ("star", "stars"), ("lady", "ladies")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("happy", "sad"), ("fast", "slow"), ("up", "down"), ("day", "night"),
             ("open", "closed"), ("light", "dark"), ("old", "new"), ("wet", "dry"), ("full", "empty"),
             ("tall", "short"), ("loud", "quiet"), ("early", "late"), ("hard", "soft"), ("left", "right"),
             ("clean", "dirty"), ("strong", "weak"), ("rich", "poor"), ("inside", "outside")]
WORDS = ["apple", "river", "garden", "pencil", "window", "rabbit", "orange", "planet", "yellow", "summer", "castle",
         "button", "forest", "candle", "dragon", "music", "cloud", "tiger", "bread", "smile", "table", "water",
         "friend", "rocket", "basket", "winter", "flower", "bottle", "monkey", "puzzle"]
SIMPLE_NOUNS = ["cat", "dog", "bird", "fox", "rabbit", "horse", "duck", "frog", "bear", "child", "mouse", "goose",
                "sheep", "baby", "puppy", "girl", "boy", "teacher"]
SIMPLE_PLURAL = dict(PLURALS) | {"rabbit": "rabbits", "horse": "horses", "duck": "ducks", "frog": "frogs",
                                 "bear": "bears", "puppy": "puppies", "girl": "girls", "boy": "boys",
                                 "teacher": "teachers"}
VERBS = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("jumps", "jump"), ("plays", "play"),
         ("eats", "eat"), ("sits", "sit"), ("swims", "swim"), ("hides", "hide"), ("waits", "wait")]
WHERE = ["in the park", "on the hill", "by the river", "under the tree", "in the garden", "near the house",
         "at home", "in the snow"]
ADJ = ["happy", "tired", "hungry", "small", "fast", "quiet", "funny", "sleepy", "clever", "wet"]
THINGS = ["book", "movie", "phone", "chair", "lamp", "pizza", "hotel", "game", "song", "bike", "jacket", "cafe",
          "camera", "backpack", "laptop", "restaurant", "show", "toy", "coffee", "shoes"]
POS = ["great", "wonderful", "excellent", "amazing", "lovely", "fantastic", "perfect", "delightful"]
NEG = ["terrible", "awful", "boring", "horrible", "disappointing", "useless", "bad", "poor"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEM = "You are a helpful assistant."
DESCRIBES_ANIMALS = {"hot", "cold", "big", "small", "happy", "sad", "fast", "slow", "old", "wet", "dry", "tall",
                     "short", "loud", "quiet", "clean", "dirty", "strong", "weak"}  # "The dog was very {word}."
# fmt: on


def sentence(rng: random.Random) -> str:
    noun, (verb, _) = rng.choice(SIMPLE_NOUNS), rng.choice(VERBS)
    return rng.choice(
        [
            f"the {noun} {verb} {rng.choice(WHERE)}",
            f"the {noun} is {rng.choice(ADJ)}",
            f"my {noun} {verb} {rng.choice(WHERE)}",
        ]
    )


def pluralize_sentence(s: str) -> str:
    """Plural of a `sentence()`: "the cat runs home" -> "the cats run home", "my goose is wet" -> "my geese are wet"."""
    words = s.split()
    words[1] = SIMPLE_PLURAL[words[1]]
    words[2] = "are" if words[2] == "is" else dict(VERBS)[words[2]]
    return " ".join(words)


def unique(
    row_fn: Callable[[random.Random], dict],
    rng: random.Random,
    n: int,
    exclude: set[str] = frozenset(),
    key: Callable[[dict], str] = lambda r: json.dumps(r, sort_keys=True),
) -> list[dict]:
    """`n` rows from `row_fn` whose `key` is neither repeated nor in `exclude`, in draw order."""
    seen, rows = set(), []
    for _ in range(n * 200):
        r = row_fn(rng)
        k = key(r)
        if k in seen or k in exclude:
            continue
        seen.add(k)
        rows.append(r)
        if len(rows) == n:
            return rows
    raise RuntimeError(f"could not draw {n} unique rows")


def alpaca_row(rng: random.Random) -> dict:
    task = rng.randrange(9)
    if task == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        op, sym, val = rng.choice([("plus", "+", a + b), ("times", "*", a * b), ("minus", "-", a - b)])
        if rng.random() < 0.5:
            return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": f"{a} {sym} {b} = {val}"}
        return {
            "instruction": rng.choice(["Compute the result.", "Solve the arithmetic problem."]),
            "input": f"{a} {sym} {b}",
            "output": str(val),
        }
    if task == 1:
        w = rng.choice(WORDS)
        return {"instruction": "Reverse the letters of the word.", "input": w, "output": w[::-1]}
    if task == 2:
        s = sentence(rng)
        if rng.random() < 0.5:
            return {"instruction": "Rewrite the sentence in capital letters.", "input": s, "output": s.upper()}
        return {
            "instruction": "Start the sentence with a capital letter and end it with a period.",
            "input": s,
            "output": cap(s) + ".",
        }
    if task == 3:
        w, p = rng.choice(PLURALS)
        if rng.random() < 0.5:
            return {
                "instruction": f'What is the plural of "{w}"?',
                "input": "",
                "output": f'The plural of "{w}" is "{p}".',
            }
        return {"instruction": "Give the plural form of the word.", "input": w, "output": p}
    if task == 4:
        w, o = rng.choice(OPPOSITES + [(b, a) for a, b in OPPOSITES])
        if rng.random() < 0.5:
            return {
                "instruction": f'What is the opposite of "{w}"?',
                "input": "",
                "output": f'The opposite of "{w}" is "{o}".',
            }
        return {"instruction": "Write the opposite of the word.", "input": w, "output": o}
    if task == 5:
        s = sentence(rng)
        return {
            "instruction": "Count the words in the sentence.",
            "input": s,
            "output": f"There are {len(s.split())} words.",
        }
    if task == 6:
        n = rng.randint(1, 200)
        kind = "an even" if n % 2 == 0 else "an odd"
        return {"instruction": f"Is {n} an even or an odd number?", "input": "", "output": f"{n} is {kind} number."}
    if task == 7:
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        return {
            "instruction": "Sort the numbers from smallest to largest.",
            "input": ", ".join(map(str, nums)),
            "output": ", ".join(map(str, sorted(nums))),
        }
    w = rng.choice(WORDS)
    return {
        "instruction": f'How many letters are in the word "{w}"?',
        "input": "",
        "output": f'The word "{w}" has {len(w)} letters.',
    }


SENTIMENT = {  # label: (templates, words for {w})
    "positive": (
        ["I love this {t}, it is {w}.", "The {t} was {w} and I would buy it again.", "What {a_w_t}!",
         "My new {t} is {w}, I am very happy with it.", "This {t} made my day. Simply {w}.",
         "Highly recommended, the {t} is {w}.", "I would give the {t} five stars. It was {w}."],
        POS,
    ),
    "negative": (
        ["I hate this {t}, it is {w}.", "The {t} was {w} and I want my money back.", "What {a_w_t}.",
         "My new {t} is {w}, I am not happy with it.", "This {t} ruined my day. Simply {w}.",
         "Do not buy it, the {t} is {w}.", "I would give the {t} one star. It was {w}."],
        NEG,
    ),
    "neutral": (
        ["The {t} arrived on {day}.", "I bought the {t} last week.", "I saw the {t} on {day}.",
         "My friend told me about the {t}.", "The {t} was in the news on {day}.",
         "I will look at the {t} again on {day}.", "We talked about the {t} at lunch."],
        [""],
    ),
}  # fmt: skip


def classification(rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` sentiment rows, the same number per label, shuffled; no text repeats or is in `exclude`."""

    def row_fn(label: str) -> Callable[[random.Random], dict]:
        def row(rng: random.Random) -> dict:
            templates, words = SENTIMENT[label]
            t, w = rng.choice(THINGS), rng.choice(words)
            slots = {"t": t, "w": w, "a_w_t": article(f"{w} {t}"), "day": rng.choice(DAYS)}
            return {"text": rng.choice(templates).format(**slots), "label": label}

        return row

    rows = []
    for label in SENTIMENT:
        rows += unique(row_fn(label), rng, n // len(SENTIMENT), exclude=exclude, key=lambda r: r["text"])
    rng.shuffle(rows)
    return rows


def seq2seq_row(rng: random.Random) -> dict:
    task = rng.randrange(5)
    if task == 0:
        letters = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 7))
        return {"source": "reverse: " + " ".join(letters), "target": " ".join(reversed(letters))}
    if task == 1:
        s = sentence(rng)
        return {"source": "plural: " + s, "target": pluralize_sentence(s)}
    if task == 2:
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        return {"source": "sort: " + " ".join(map(str, nums)), "target": " ".join(map(str, sorted(nums)))}
    if task == 3:
        s = sentence(rng)
        return {"source": "uppercase: " + s, "target": s.upper()}
    w, o = rng.choice(OPPOSITES + [(b, a) for a, b in OPPOSITES])
    return {"source": "opposite: " + w, "target": o}


def chat_row(rng: random.Random) -> dict:
    task = rng.randrange(4)
    if task == 0:
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        msgs = [("user", f"What is {a} plus {b}?"), ("assistant", f"{a} plus {b} is {a + b}.")]
        if rng.random() < 0.5:
            k = rng.randint(2, 9)
            msgs += [("user", f"And if I add {k} more?"), ("assistant", f"Then you have {a + b + k}.")]
    elif task == 1:
        w, p = rng.choice(PLURALS)
        msgs = [("user", f"What is the plural of {w}?"), ("assistant", f'The plural of "{w}" is "{p}".')]
        if rng.random() < 0.5:
            w2, p2 = rng.choice([x for x in PLURALS if x[0] != w])
            msgs += [("user", f"And the singular of {p2}?"), ("assistant", f'The singular of "{p2}" is "{w2}".')]
    elif task == 2:
        animal = rng.choice(ANIMALS)
        msgs = [("user", f"Tell me a short story about {article(animal)}."), ("assistant", story(rng, kind=animal))]
        if rng.random() < 0.5:
            msgs += [("user", "Thank you, I liked it!"), ("assistant", "You're welcome! I'm glad you liked it.")]
    else:
        w, o = rng.choice(OPPOSITES + [(b, a) for a, b in OPPOSITES])
        msgs = [("user", f"What is the opposite of {w}?"), ("assistant", f'The opposite of "{w}" is "{o}".')]
        if o in DESCRIBES_ANIMALS and rng.random() < 0.5:
            msgs += [
                ("user", "Can you use it in a sentence?"),
                ("assistant", f'Sure: "The {rng.choice(SIMPLE_NOUNS)} was very {o}."'),
            ]
    if rng.random() < 0.3:
        msgs = [("system", SYSTEM)] + msgs
    return {"messages": [{"role": r, "content": c} for r, c in msgs]}


def preference_row(rng: random.Random) -> dict:
    """A story's opening as the prompt; its next sentence as the chosen answer, and as the rejected one the same
    sentence spoiled (its words shuffled, or one word repeated): the preferred answer is clearly the better one."""
    sentences = re.findall(r"[^.!?]+[.!?]", story(rng))
    k = rng.randint(1, min(3, len(sentences) - 1))
    prompt, answer = "".join(sentences[:k]).strip(), sentences[k]
    words = answer.split()
    if rng.random() < 0.7 and len(set(words)) > 2:
        spoiled = words[:]
        while spoiled == words:
            rng.shuffle(spoiled)
    else:
        spoiled = [rng.choice(words)] * len(words)
    return {"prompt": prompt, "chosen": " " + " ".join(words), "rejected": " " + " ".join(spoiled)}


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def train_tokenizer(lines: list[str], out: Path, check: list[str]) -> None:
    from transformers import AutoTokenizer

    from finetune.tokenizer import train_bpe

    # Our trainer learns the merges tokenizers' BpeTrainer would (same vocabulary, same tokenizer.json).
    tok = train_bpe(iter(lines), vocab_size=VOCAB_SIZE, special_tokens=(EOS, PAD), min_frequency=2)
    if out.exists():
        shutil.rmtree(out)
    tok.save(out, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)  # ByteLevel post-processor: no BOS

    loaded = AutoTokenizer.from_pretrained(str(out))
    assert loaded.bos_token == EOS and loaded.eos_token == EOS and loaded.pad_token == PAD, loaded
    assert len(loaded) == VOCAB_SIZE, len(loaded)
    ids = loaded(check[0])["input_ids"]
    assert ids == loaded.encode(check[0]) and not {loaded.eos_token_id, loaded.pad_token_id} & set(ids), "adds specials"
    for line in check:
        ids = loaded.encode(line)
        assert tok.encode(line) == ids and loaded.decode(ids) == line, line


def write_preference(out: Path, seed: int) -> None:
    """preference_sample.jsonl (400 pairs) and its validation file (80 pairs, no prompt shared with train)."""
    train = unique(preference_row, random.Random(seed + 7), 400, key=lambda r: r["prompt"])
    held_out = unique(preference_row, random.Random(seed + 8), 80, exclude={r["prompt"] for r in train},
                      key=lambda r: r["prompt"])  # fmt: skip
    write_jsonl(out / "preference_sample.jsonl", train)
    write_jsonl(out / "preference_sample_validation.jsonl", held_out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "recipes" / "data")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    out, seed = args.out, args.seed
    t0 = time.perf_counter()

    train = stories(seed, TRAIN_BYTES)
    validation = stories(seed + 1, VALIDATION_BYTES, exclude=set(train))
    assert not set(train) & set(validation)
    write_text(out / "quickstart" / "train.txt", "\n".join(train) + "\n")
    write_text(out / "quickstart" / "validation.txt", "\n".join(validation) + "\n")

    alpaca = unique(alpaca_row, random.Random(seed + 2), 200)
    cls_train = classification(random.Random(seed + 3), 300)
    cls_val = classification(random.Random(seed + 4), 60, exclude={r["text"] for r in cls_train})
    seq2seq = unique(seq2seq_row, random.Random(seed + 5), 200, key=lambda r: r["source"])
    chat = unique(chat_row, random.Random(seed + 6), 100)
    write_jsonl(out / "alpaca_sample.jsonl", alpaca)
    write_csv(out / "classification_sample.csv", cls_train)
    write_csv(out / "classification_sample_validation.csv", cls_val)
    write_jsonl(out / "seq2seq_sample.jsonl", seq2seq)
    write_jsonl(out / "chat_sample.jsonl", chat)
    write_preference(out, seed)

    samples = (
        [r[k] for r in alpaca for k in r]
        + [r["text"] for r in cls_train]
        + [r[k] for r in seq2seq for k in r]
        + [m["content"] for r in chat for m in r["messages"]]
    )
    train_tokenizer(train, out / "quickstart" / "tokenizer", check=validation + samples)

    for path in sorted(q for q in out.rglob("*") if q.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"{path.stat().st_size:>9,d}  {digest}  {path.relative_to(out)}")
    print(f"{len(train)} train / {len(validation)} validation stories; {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
