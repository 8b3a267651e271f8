"""Calibration and evaluation files that are not UTF-8 text, JSONL rows without a string ``text``,
oversized files and bad batch sizes: one clear LowbitError naming the file and line, no traceback."""

from __future__ import annotations

import pytest

from lowbit.data import check_batch_size, load_rows, load_text
from lowbit.data import corpora
from lowbit.errors import LowbitError


@pytest.mark.parametrize("suffix", [".txt", ".raw", ".jsonl"])
def test_binary_bytes_name_the_file_and_line(tmp_path, suffix):
    path = tmp_path / f"calib{suffix}"
    path.write_bytes(b'{"text": "fine"}\n' + b"\xff\xfe binary\n")
    with pytest.raises(LowbitError, match=rf"^data file {path} is not UTF-8 text: byte 0xff at line 2 \(offset 17\); "
                                          "it must be a UTF-8 text file$"):
        load_rows(str(path))


@pytest.mark.parametrize("row, shown", [('{"text": 5}', "5"), ('{"text": null}', "null"),
                                        ('{"text": ["a"]}', '["a"]'), ('{"text": {"a": 1}}', '{"a": 1}')])
def test_jsonl_text_must_be_a_string(tmp_path, row, shown):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n\n' + row + "\n")
    with pytest.raises(LowbitError) as info:
        load_text(str(path))
    assert str(info.value) == (f"{path} line 3: 'text' is {shown}, not a string; each row needs a string "
                               '"text" field')


@pytest.mark.parametrize("row", ["[1, 2]", '"just a string"', "{}", '{"txt": "a"}', "[" * 100_000 + "]" * 100_000])
def test_jsonl_rows_that_are_not_objects_with_text(tmp_path, row):
    path = tmp_path / "rows.jsonl"
    path.write_text(row + "\n")
    with pytest.raises(LowbitError, match=rf"^{path} line 1 is not a JSON object with a 'text' field"):
        load_rows(str(path))


def test_huge_files_are_refused_before_reading_them_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "MAX_DATA_BYTES", 16)
    path = tmp_path / "big.txt"
    path.write_text("x" * 17)
    with pytest.raises(LowbitError, match=rf"data file {path} is larger than the .* MiB lowbit reads"):
        load_text(str(path))
    path.write_text("x" * 16)
    assert load_text(str(path)) == "x" * 16


def test_bad_bytes_in_a_named_corpus_file(tmp_path):
    bad = tmp_path / "wikitext-2-raw" / "wiki.test.raw"
    bad.parent.mkdir()
    bad.write_bytes(b" = Title = \n\x80\n")
    with pytest.raises(LowbitError, match=f"data file {bad} is not UTF-8 text: byte 0x80 at line 2"):
        load_rows("wikitext2", "test", data_dir_override=tmp_path)


def test_calibration_file_with_bad_bytes_through_the_cli(run_cli, clean_error, smollm, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes(b"some text\n" + bytes(range(128, 256)))
    code, _, err = run_cli("quantize", "smollm2-135m", "--method", "rtn", "--bits", "8", "--calib", str(path))
    clean_error(code, err, f"data file {path} is not UTF-8 text", "line 2")


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "8", None])
def test_check_batch_size(value):
    with pytest.raises(LowbitError) as info:
        check_batch_size(value, "--batch-size")
    assert str(info.value) == (f"--batch-size must be a positive integer (calibration windows per forward pass, "
                               f"e.g. 8), got {value!r}")
    check_batch_size(1)
    check_batch_size(64)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_batch_size_is_checked_before_the_model_loads(run_cli, clean_error, value):
    code, _, err = run_cli("quantize", "smollm2-135m", "--method", "rtn", "--batch-size", value)
    clean_error(code, err, "--batch-size must be a positive integer", f"got {value}")
