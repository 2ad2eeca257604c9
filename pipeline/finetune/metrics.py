"""SuperGLUE metrics, computed the way the leaderboard computes them.

Plain Python (and no sklearn): every function takes lists of gold labels and predictions and returns a
fraction in [0, 1] (the leaderboard shows these x100). Undefined ratios (0/0) count as 0, as sklearn and
allennlp do.

  BoolQ, COPA, RTE, WiC, WSC  accuracy
  CB                          mean(macro-F1 over the classes in gold or predictions, accuracy)
  MultiRC                     mean(F1a, EM): F1a = binary F1 of the positive class over all answer options;
                              EM = fraction of questions whose answer options are all right
  ReCoRD                      mean(F1, EM): per query the max over the gold answers of SQuAD token F1 / exact
                              match after SQuAD's normalize_answer
  AX-b                        Matthews correlation
  AX-g                        accuracy and gender parity (fraction of pairs with the same prediction)
  overall                     mean of the 8 task scores (AX-b and AX-g are reported but not averaged)
"""
import re
import string
from collections import Counter, defaultdict
from pipeline.errors import DataError

# The 8 tasks of the SuperGLUE score, in the leaderboard's column order.
SUPERGLUE_TASKS = ("BoolQ", "CB", "COPA", "MultiRC", "ReCoRD", "RTE", "WiC", "WSC")


def _check_lengths(golds, preds):
    if len(golds) != len(preds):
        raise DataError(f"{len(golds)} gold labels but {len(preds)} predictions")
    if not golds:
        raise DataError("no examples to score")


def _ratio(numerator, denominator):
    return numerator / denominator if denominator else 0.0


def accuracy(golds, preds):
    _check_lengths(golds, preds)
    return sum(g == p for g, p in zip(golds, preds)) / len(golds)


def f1_for_class(golds, preds, positive):
    """F1 of one class against the rest: 2·TP / (2·TP + FP + FN)."""
    _check_lengths(golds, preds)
    true_pos = sum(g == positive and p == positive for g, p in zip(golds, preds))
    false_pos = sum(g != positive and p == positive for g, p in zip(golds, preds))
    false_neg = sum(g == positive and p != positive for g, p in zip(golds, preds))
    return _ratio(2 * true_pos, 2 * true_pos + false_pos + false_neg)


def macro_f1(golds, preds, labels):
    """Unweighted mean of the per-class F1 over `labels` (CB: the labels in gold or predictions, as sklearn's
    f1_score(average="macro"))."""
    return sum(f1_for_class(golds, preds, label) for label in labels) / len(labels)


def matthews_corrcoef(golds, preds):
    """Matthews correlation (Gorodkin's multi-class R_K; the usual formula for 2 classes).

    With C the confusion matrix, c = trace, s = total, t_k / p_k the true / predicted counts of class k:
    (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)); 0 when a factor under the root is 0.
    """
    _check_lengths(golds, preds)
    true_counts, pred_counts = Counter(golds), Counter(preds)
    total = len(golds)
    correct = sum(g == p for g, p in zip(golds, preds))
    classes = set(true_counts) | set(pred_counts)
    cov_true_pred = correct * total - sum(pred_counts[k] * true_counts[k] for k in classes)
    cov_pred = total * total - sum(pred_counts[k] ** 2 for k in classes)
    cov_true = total * total - sum(true_counts[k] ** 2 for k in classes)
    if cov_pred == 0 or cov_true == 0:
        return 0.0
    return cov_true_pred / (cov_pred * cov_true) ** 0.5


def multirc_scores(golds, preds, question_ids):
    """MultiRC: `golds`/`preds` are 0/1 per answer option; `question_ids` says which question each belongs to."""
    _check_lengths(golds, preds)
    if len(question_ids) != len(golds):
        raise DataError(f"{len(question_ids)} question ids for {len(golds)} answer options")
    all_right = defaultdict(lambda: True)
    for gold, pred, question in zip(golds, preds, question_ids):
        all_right[question] = all_right[question] and gold == pred
    exact_match = sum(all_right.values()) / len(all_right)
    return {"f1a": f1_for_class(golds, preds, positive=1), "em": exact_match}


# --- ReCoRD: the SQuAD v1.1 evaluation functions, which the ReCoRD and SuperGLUE scorers reuse ----------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text):
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1 order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction, gold):
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, gold):
    return float(normalize_answer(prediction) == normalize_answer(gold))


def record_scores(predictions, gold_answer_lists):
    """ReCoRD: one predicted string per query, a list of gold strings per query; max over golds, mean over queries."""
    _check_lengths(gold_answer_lists, predictions)
    f1_total = em_total = 0.0
    for prediction, golds in zip(predictions, gold_answer_lists):
        if not golds:
            raise DataError("a ReCoRD query has no gold answers (test split?)")
        f1_total += max(token_f1(prediction, gold) for gold in golds)
        em_total += max(exact_match(prediction, gold) for gold in golds)
    count = len(predictions)
    return {"f1": f1_total / count, "em": em_total / count}


def gender_parity(preds, pair_ids):
    """AX-g: fraction of minimal pairs (examples sharing a pair id) whose predictions are all the same."""
    if len(preds) != len(pair_ids):
        raise DataError(f"{len(pair_ids)} pair ids for {len(preds)} predictions")
    if not preds:
        raise DataError("no examples to score")
    predictions_by_pair = defaultdict(set)
    for pred, pair in zip(preds, pair_ids):
        predictions_by_pair[pair].add(pred)
    same = sum(len(predicted) == 1 for predicted in predictions_by_pair.values())
    return same / len(predictions_by_pair)


def mean_score(metric_values):
    """A task's leaderboard score: the mean of its metrics (CB, MultiRC, ReCoRD have two)."""
    values = list(metric_values)
    return sum(values) / len(values)


def superglue_score(task_scores):
    """The SuperGLUE score: the unweighted mean of the 8 task scores (`task_scores`: task name -> score)."""
    missing = [name for name in SUPERGLUE_TASKS if name not in task_scores]
    if missing:
        raise DataError(f"the SuperGLUE score needs all 8 tasks; missing {', '.join(missing)}")
    return sum(task_scores[name] for name in SUPERGLUE_TASKS) / len(SUPERGLUE_TASKS)
