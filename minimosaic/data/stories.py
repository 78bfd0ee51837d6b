"""The embedded corpus ("stories"): short stories minimosaic writes itself from a seed, offline.

The names, objects and places introduced early come back later (who found what, where it was hidden),
so a model that recalls its context predicts better. Everything here is written for minimosaic; no
third-party text.
"""
import random


_NAMES = ("Mira Tom Lena Omar Ravi Sofia Ben Ada Leo Nina Hugo Ivy Kai Zoe Max Ella Finn Lily Sam Rosa "
          "Theo Maya Jack Anna Eli Ruby Noah Luna Otto Iris Felix Nora Hana Yuki Amir Lea Jonas Clara "
          "Milo Greta Pablo Emma Ivan Sara Arlo Dina Oscar Wren Tariq Elsa Rami Juno Caleb Fern Bruno "
          "Tess Kofi Pia Lars Mina Basil Olga Dev Rhea").split()
_CREATURES = ("girl boy rabbit fox bear mouse cat dog owl duck frog turtle squirrel hedgehog goat lamb "
              "robot dragon penguin otter badger pony").split()
_ADJECTIVES = ("little curious brave kind shy clever happy sleepy tiny cheerful gentle quiet busy funny "
               "careful bold").split()
_PLACES = (  # (where the story starts, how it is called later)
    ("in a small village by the river", "the village"), ("in the big green forest", "the forest"),
    ("in a house on the hill", "the house on the hill"), ("on a farm near the lake", "the farm"),
    ("in a busy town", "the town"), ("in a cabin in the woods", "the cabin"),
    ("in a town by the sea", "the town by the sea"), ("in an old castle", "the castle"),
    ("in a quiet valley", "the valley"), ("in a tree house", "the tree house"),
    ("in a sunny meadow", "the meadow"), ("by a mill on the stream", "the mill"),
    ("on a tiny island", "the island"), ("in a village in the mountains", "the mountain village"),
    ("in a garden behind the school", "the garden"))
_TRIPS = ("the market|the beach|the library|the old bridge|the park|the bakery|the top of the hill|"
          "the pond|the fair|the big barn|the lighthouse|the orchard").split("|")
_OBJECTS = ("ball kite key book hat lamp map box drum shell stone cup bell ring feather flute boat "
            "basket scarf clock compass jar brush coin spoon candle puzzle mirror whistle blanket "
            "marble button").split()
_COLORS = "red blue green yellow purple orange silver golden white black pink brown".split()
_FOUND_AT = ("by the river|near the big oak tree|under a bridge|next to the pond|behind the barn|at the "
             "market|on the beach|in the tall grass|under a pile of leaves|beside the old well").split("|")
_HIDDEN_IN = ("under the bed|in the basket|behind the door|on the top shelf|in the garden|under a tree|"
              "inside an old boot|in the kitchen|under the stairs|in a flower pot|behind the curtain|"
              "in the toy box").split("|")
_FOODS = "apples|bread and jam|warm soup|cookies|a big cake|berries|apple pie|honey|pancakes".split("|")
_ACTIVITIES = ("play a game|build a fort|read stories|sing songs|paint pictures|go fishing|plant "
               "flowers|look at the stars|fly a kite|have a picnic").split("|")
_FEELINGS = "sad|worried|surprised|upset|scared|very quiet".split("|")


def _story(rng):
    """One story. The same names and things recur, so remembering the beginning pays off at the end."""
    c = rng.choice
    a, b, d = rng.sample(_NAMES, 3)
    obj, color, (at, home), trip = c(_OBJECTS), c(_COLORS), c(_PLACES), c(_TRIPS)
    found, hid1, hid2 = c(_FOUND_AT), *rng.sample(_HIDDEN_IN, 2)
    kind_a, kind_b, kind_d = c(_CREATURES), c(_CREATURES), c(_CREATURES)
    adj_a, adj_b = c(_ADJECTIVES), c(_ADJECTIVES)
    s = [c([f"Once upon a time, there was a {adj_a} {kind_a} named {a}.",
            f"There once lived a {adj_a} {kind_a} called {a}.",
            f"Long ago, {at}, lived a {adj_a} {kind_a} named {a}.",
            f"{a} was a {adj_a} {kind_a}."]),
         c([f"{a} lived {at} with a {adj_b} {kind_b} named {b}.",
            f"{a} had a best friend, a {adj_b} {kind_b} called {b}, and they lived {at}.",
            f"{at[0].upper()}{at[1:]}, {a} and {b} the {kind_b} were the best of friends."]),
         c([f"One day, {a} found a {color} {obj} {found}.",
            f"One morning, {a} saw something shiny {found}. It was a {color} {obj}!",
            f"On a windy day, {a} was walking with {b} and found a {color} {obj} {found}."]),
         c([f"\"Look, {b}! A {color} {obj}!\" said {a}.",
            f"\"What a beautiful {obj},\" said {b}.",
            f"{b} said, \"I have never seen a {color} {obj} before.\""])]
    middle = [f"{a} and {b} went to {trip} to {c(_ACTIVITIES)}.",
              f"They ate {c(_FOODS)} and talked about the {obj}.",
              f"{b} wanted to hold the {obj}, so {a} let {b} hold it for a while.",
              f"On the way to {trip}, they met a {kind_d} named {d}. {d} asked, \"Where did you get "
              f"that {obj}?\" {a} said, \"I found it {found}.\"",
              f"It started to rain, so {a} and {b} ran back to {home}.",
              f"Back at {home}, {a} showed the {color} {obj} to everyone."]
    s += rng.sample(middle, rng.randint(2, 4))
    s += [c([f"But later, the {obj} was gone! {a} felt {c(_FEELINGS)}.",
             f"That evening, {a} could not find the {color} {obj} anywhere.",
             f"The next day, the {obj} was missing, and {b} was {c(_FEELINGS)}."]),
          f"{a} and {b} looked {hid1}, but it was not there. Then they looked {hid2}, "
          f"and there was the {color} {obj}!",
          c([f"From that day on, {a} kept the {obj} {hid1}, where {b} could see it.",
             f"{a} hugged {b}, and they played with the {obj} until the sun went down.",
             f"\"Thank you, {b}!\" said {a}. They went back to {home}, happy and tired."])]
    if rng.random() < 0.5:
        s.append(c([f"Where was the {obj}? It was {hid2}.",
                    f"Who found the {color} {obj} {found}? It was {a}.",
                    f"What did {a} find {found}? A {color} {obj}."]))
    return " ".join(s)


def generate_stories(n_chars=1_500_000, seed=0):
    """The embedded corpus: whole stories, blank-line separated, until at least `n_chars` characters.

    Deterministic for a given seed (Python's `random.Random`), ASCII only, about 0.1 s per MB.
    """
    rng = random.Random(seed)
    stories, total = [], 0
    while total < n_chars:
        stories.append(_story(rng))
        total += len(stories[-1]) + 2
    return "\n\n".join(stories) + "\n"
