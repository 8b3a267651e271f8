"""The bounded YAML loader every user YAML goes through: alias bombs, deep nesting, huge and binary
files, recursive aliases and duplicate keys are refused at once with a one-line error naming the
source, and parse errors carry their line and column."""

from __future__ import annotations

import time

import pytest

from lowbit.errors import LowbitError
from lowbit.recipe import load_recipe
from lowbit.safeio import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, load_yaml, read_text


def billion_laughs(levels: int = 9, width: int = 9, under: str = "name") -> str:
    """A recipe whose ``name`` (or ``spec.bits``) is ``width ** levels`` strings through ``levels`` anchors."""
    text = "a0: &a0 [" + ", ".join(['"lol"'] * width) + "]\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]\n"
    top = f"*a{levels - 1}"
    if under == "name":
        return text + f"name: {top}\nmethods: [{{method: rtn}}]\n"
    return text + f"methods: [{{method: rtn, spec: {{bits: {top}}}}}]\n"


@pytest.mark.parametrize("under", ["name", "spec.bits"])
def test_billion_laughs_is_refused_at_once(tmp_path, under):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs(under=under))
    t0 = time.perf_counter()
    with pytest.raises(LowbitError, match=rf"recipe {path} expands to more than 100,000 values through its aliases"):
        load_recipe(path)
    assert time.perf_counter() - t0 < 2.0  # measured 0.001 s (it was a MemoryError after 48 s)


def test_aliases_that_stay_small_are_fine():
    data = load_yaml("base: &b {bits: 4, granularity: group, group_size: 64}\nspecs: [*b, *b]\n", "t")
    assert data["specs"][1] == {"bits": 4, "granularity": "group", "group_size": 64}
    assert load_yaml("base: &b {a: 1}\nmerged: {<<: *b, c: 2}\n", "t")["merged"] == {"a": 1, "c": 2}


def test_expansion_limit_counts_values_not_text():
    small = billion_laughs(levels=4, width=10)  # 10**4 strings: under the cap
    assert len(load_yaml(small, "t")["name"]) == 10
    with pytest.raises(LowbitError, match="expands to more than"):
        load_yaml(billion_laughs(levels=6, width=10), "t")  # 10**6 > MAX_YAML_NODES
    assert MAX_YAML_NODES == 100_000


@pytest.mark.parametrize("text", ["name: " + "[" * 5000 + "]" * 5000, "name:\n" + "".join(" " * i + "- \n" for i in range(100)),
                                  "a: " + "{b: " * 40 + "1" + "}" * 40])
def test_deep_nesting_is_refused(text):
    with pytest.raises(LowbitError, match=rf"^src nests deeper than {MAX_YAML_DEPTH} levels \(line \d+, column \d+\)"):
        load_yaml(text, "src")


def test_recursive_alias_and_duplicate_keys():
    with pytest.raises(LowbitError, match="alias at line 1, column 11 refers to a node that contains it"):
        load_yaml("x: &x [1, *x]", "src")
    with pytest.raises(LowbitError, match="src repeats the key 'damp' at line 2, column 1"):
        load_yaml("damp: 0.1\ndamp: 0.2\n", "src")


@pytest.mark.parametrize("text, needle", [
    ("name: r\nmethods:\n  - method: gptq\n    options: {damp: 0.01\n", "expected ',' or '}'"),
    ("name: r\nmethods: [\n", "line 3, column 1"),
    ("a: b: c\n", "mapping values are not allowed here at line 1, column 5"),
    ("a: 1\n---\nb: 2\n", "but found another document at line 2, column 1"),
    ("a: !!python/object:os.system x\n", "could not determine a constructor"),
    ("d: 2024-13-45\n", "month must be in 1..12"),
    ("a: \x00\n", "unacceptable character #x0000"),
])
def test_invalid_yaml_names_the_place(text, needle):
    with pytest.raises(LowbitError) as info:
        load_yaml(text, "recipe r.yaml")
    message = str(info.value)
    assert message.startswith("recipe r.yaml is not valid YAML: ") and needle in message and "\n" not in message


def test_binary_and_huge_recipe_files(tmp_path):
    binary = tmp_path / "random.yaml"
    binary.write_bytes(b"name: r\n" + bytes(range(128, 256)))
    with pytest.raises(LowbitError, match=rf"recipe {binary} is not UTF-8 text: byte 0x80 at line 2 \(offset 8\)"):
        load_recipe(binary)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(LowbitError, match=rf"recipe {huge} is larger than the 1 MiB"):
        load_recipe(huge)
    with pytest.raises(LowbitError, match="larger than the 1 MiB lowbit reads as YAML"):
        load_yaml("#" * (MAX_YAML_BYTES + 1), "--option x")


def test_read_text_refuses_directories_and_caps_bytes(tmp_path):
    with pytest.raises(LowbitError, match=f"cannot read data file {tmp_path}"):
        read_text(tmp_path, 10, "data file")
    (tmp_path / "a.txt").write_text("0123456789A")
    with pytest.raises(LowbitError, match="larger than"):
        read_text(tmp_path / "a.txt", 10, "data file")
    assert read_text(tmp_path / "a.txt", 11) == "0123456789A"


def test_cli_reports_yaml_problems_cleanly(run_cli, clean_error, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    code, _, err = run_cli("quantize", "smollm2-135m", "--recipe", str(bomb))
    clean_error(code, err, f"recipe {bomb}", "expands to more than")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli("quantize", "smollm2-135m", "--recipe", str(binary))
    clean_error(code, err, f"recipe {binary}")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: r\nmethods:\n  - method: gptq\n    options: {damp: 0.01\n")
    code, _, err = run_cli("quantize", "smollm2-135m", "--recipe", str(broken))
    clean_error(code, err, f"recipe {broken} is not valid YAML", "line 5, column 1")
