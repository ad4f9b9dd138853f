"""Prompt sets and the one prompt loader train.py and sample.py share (nanoddpo/prompts.py).

    python -m pytest -q tests/test_4_prompts.py
"""
import json

import pytest

from nanoddpo.prompts import (PROMPTS, PromptError, animals_activities, imagenet_animals, load_prompts, simple_animals,
                              spread)


def test_prompt_sets():
    animals, activities = simple_animals(), animals_activities()
    assert len(animals) == len(set(animals)) == 45 and len(activities) == len(set(activities)) == 135
    assert animals[:3] == ["cat", "dog", "horse"] and "ant" in animals  # bare words, as in the reference codes
    assert not any(p.split()[0] in ("a", "an") for p in animals)
    assert "an ant riding a bike" in activities and "a hedgehog playing chess" in activities
    assert "a ant riding a bike" not in activities
    assert all(p.split()[0] in ("a", "an") for p in activities)
    assert PROMPTS["simple_animals"]() == animals and PROMPTS["animals_activities"]() == activities


def test_spread_takes_prompts_evenly_over_the_list():  # the prompts of train.py's grids and sample.py's default
    assert spread(list("abcdefghij")) == list("aceg") and spread(list("abcdefgh"), 2) == list("ae")
    assert spread(list("abc")) == list("abc")


def test_prompt_sets_are_the_papers_word_for_word():
    # the reference's lists, copied here from the paper's code as data: a misspelt or reworded prompt changes the task
    animals = ("cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
               "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose "
               "bee pig turkey fly llama camel bat gorilla hedgehog kangaroo").split()
    assert simple_animals() == animals
    activities = ["washing the dishes", "riding a bike", "playing chess"]
    assert animals_activities() == [f"{'an' if a[0] in 'aeiou' else 'a'} {a} {act}" for a in animals for act in activities]


def test_imagenet_animals_are_whole_lines():
    prompts = imagenet_animals()
    assert len(prompts) == 398 and PROMPTS["imagenet_animals"]() == prompts
    assert prompts[0] == "tench, Tinca tinca"  # the whole line: synonyms and Latin name included
    assert prompts[2].startswith("great white shark, white shark") and prompts[-1].startswith("puffer")
    assert all(p and p == p.strip() for p in prompts)


def test_load_prompts_sets_and_default(tmp_path):
    for name, make in PROMPTS.items():
        prompts, why = load_prompts(name, tmp_path)
        assert prompts == make() and name in why
    prompts, why = load_prompts("", tmp_path)  # the model has no prompts.json
    assert prompts == simple_animals() and "simple_animals" in why and "no prompts.json" in why
    (tmp_path / "prompts.json").write_text(json.dumps(["a red circle", "a blue square"]))
    prompts, why = load_prompts("", tmp_path)
    assert prompts == ["a red circle", "a blue square"] and str(tmp_path / "prompts.json") in why
    assert load_prompts("simple_animals", tmp_path)[0] == simple_animals()  # a named set wins over the model's file


def test_load_prompts_text_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("  a cat  \n\na dog\n   \nan owl, at night\n")  # a trailing newline, blank and padded lines
    prompts, why = load_prompts(str(path), tmp_path)
    assert prompts == ["a cat", "a dog", "an owl, at night"] and str(path) in why
    path.write_text("\n  \n")
    with pytest.raises(PromptError, match="holds no prompt"):
        load_prompts(str(path), tmp_path)
    path.write_bytes("\ufeffa cat\na dog\n".encode())  # the byte-order mark Notepad writes is not part of a prompt
    assert load_prompts(str(path), tmp_path)[0] == ["a cat", "a dog"]


def test_load_prompts_file_not_utf8(tmp_path):
    for name in ("latin1.txt", "latin1.json"):
        path = tmp_path / name
        path.write_bytes('["un café"]'.encode("latin-1"))
        with pytest.raises(PromptError) as err:
            load_prompts(str(path), tmp_path)
        assert str(err.value) == f"prompt file {path} is not UTF-8 text: save it as UTF-8"


def test_load_prompts_json_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(["a cat", " a dog"]))
    assert load_prompts(str(path), tmp_path)[0] == ["a cat", " a dog"]
    for content, found in [({"prompts": ["a cat"]}, "found a dict"), ("a cat", "found a str"),
                           (["a cat", 3], "index 1: 3"), (["a cat", ["a dog"]], 'index 1: ["a dog"]'),
                           (["a cat", ""], 'index 1: ""'), ([], "holds no prompt")]:
        path.write_text(json.dumps(content))
        with pytest.raises(PromptError, match="holds no prompt" if not content else "list") as err:
            load_prompts(str(path), tmp_path)
        assert str(path) in str(err.value) and found in str(err.value), err.value
        assert isinstance(err.value, ValueError)  # train.py and sample.py catch ValueError
    path.write_text("[\"a cat\",")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompts(str(path), tmp_path)
    (tmp_path / "prompts.json").write_text(json.dumps({"a": 1}))  # the model's own file is checked the same way
    with pytest.raises(PromptError, match="prompts.json must hold a JSON list"):
        load_prompts("", tmp_path)


def test_load_prompts_unknown_spec_lists_the_sets(tmp_path):
    with pytest.raises(ValueError) as err:
        load_prompts("simple_animal", tmp_path)
    assert "'simple_animal' is neither a file nor a prompt set" in str(err.value)
    for name in ["simple_animals", "animals_activities", "imagenet_animals"]:
        assert name in str(err.value)
