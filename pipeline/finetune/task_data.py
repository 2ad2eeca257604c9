"""Reading a task's examples: the official SuperGLUE layout `DIR/<Task>/{train,val,test}.jsonl` (diagnostics:
`DIR/AX-b/AX-b.jsonl`, `DIR/AX-g/AX-g.jsonl`), GLUE's `DIR/MNLI/*.tsv`, or without DIR the Hugging Face copies
through `datasets`. A missing split or field, invalid UTF-8 or JSON, or an unknown label stops with a
DataError naming the file and line.
"""
import json
import os

from pipeline.errors import DataError


def _lines(path):
    """(line number, text) of a UTF-8 file; invalid UTF-8 is a DataError naming the line."""
    with open(path, "rb") as lines:
        for line_no, raw in enumerate(lines, 1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_no}: invalid UTF-8 (byte {error.start} of the line)") from None


def _read_jsonl(path):
    for line_no, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield record, where


def _read_tsv(path):
    # GLUE's TSV files are not CSV-quoted (quotes are literal text), so split on tabs only.
    header = None
    for line_no, line in _lines(path):
        line = line.rstrip("\r\n")
        if header is None:
            header = line.split("\t")
            continue
        if not line:
            continue
        values = line.split("\t")
        if len(values) != len(header):
            raise DataError(f"{path}:{line_no}: {len(values)} columns, the header has {len(header)}")
        yield dict(zip(header, values)), f"{path}:{line_no}"


def split_path(task, split, data_dir):
    if split not in task.splits:
        raise DataError(f"{task.name} has no {split!r} split (it has: {', '.join(task.splits)})")
    folder = os.path.join(data_dir, task.name)
    for file_name in task.splits[split]:
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            return path
    raise DataError(f"{task.name} {split} split not found: expected {os.path.join(folder, task.splits[split][0])}")


def check_gold(task, examples, split, where):
    """Train and validation data must be labelled; only test may go without."""
    if split.startswith("test"):
        return
    for example in examples:
        if not example.has_gold(task.kind):
            what = "answers" if task.kind == "entity_scoring" else "label"
            raise DataError(f"{where}: missing {what} in the {split} split (idx {example.key!r})")


def load_examples(task, split, data_dir=None):
    """Examples of one split ("train", "val", "test"; MNLI also "val_mismatched", "test_mismatched").

    From `data_dir` in the official layout, or, when data_dir is None, through `datasets`.
    """
    if data_dir is None:
        return load_from_datasets(task, split)
    path = split_path(task, split, data_dir)
    reader = _read_tsv if task.file_format == "tsv" else _read_jsonl
    examples = []
    for record, where in reader(path):
        parsed = task.parse(task, record, where)
        check_gold(task, parsed, split, where)
        examples.extend(parsed)
    if not examples:
        raise DataError(f"{path}: no examples")
    return task.finish_examples(task, examples, path)


def load_from_datasets(task, split):
    import datasets  # optional at import time; only this path needs it

    if split not in task.hf_splits:
        raise DataError(f"{task.name} has no {split!r} split (it has: {', '.join(task.hf_splits)})")
    dataset = datasets.load_dataset(*task.hf_config, split=task.hf_splits[split])
    label_feature = dataset.features.get("label")
    label_names = list(label_feature.names) if label_feature is not None else []
    source = f"datasets:{'/'.join(task.hf_config)}[{task.hf_splits[split]}]"
    return examples_from_rows(task, split, dataset, label_names, source)


def examples_from_rows(task, split, rows, label_names, source):
    """Examples from `datasets`-style rows (dicts); `label_names` are the ClassLabel names."""
    examples = task.hf_rows(task, rows, label_names, source)
    check_gold(task, examples, split, source)
    return task.finish_examples(task, examples, source)
