"""Leaderboard metrics on hand-computed examples (arithmetic in the comments)."""
import math

import pytest

from pipeline.finetune import metrics


def test_accuracy():
    # 3 of 4 equal -> 0.75
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_accuracy_rejects_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no examples"):
        metrics.accuracy([], [])


def test_cb_macro_f1():
    golds = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 2]
    # class 0: TP 1 (pos 0), FP 1 (pos 4), FN 1 (pos 1) -> 2/(2+1+1) = 0.5
    # class 1: TP 2 (pos 2,3), FP 1 (pos 1), FN 0      -> 4/(4+1+0) = 0.8
    # class 2: TP 1 (pos 5), FP 0, FN 1 (pos 4)        -> 2/(2+0+1) = 2/3
    # macro = (0.5 + 0.8 + 0.6667) / 3 = 0.65556
    assert metrics.macro_f1(golds, preds, labels=[0, 1, 2]) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # CB score = mean(F1, accuracy 4/6)
    assert metrics.mean_score([metrics.macro_f1(golds, preds, [0, 1, 2]), metrics.accuracy(golds, preds)]) == \
        pytest.approx(((0.5 + 0.8 + 2 / 3) / 3 + 4 / 6) / 2)


def test_macro_f1_counts_a_never_seen_class_as_zero():
    # class 2 is never gold nor predicted: F1 0/0 -> 0, so macro = (1 + 1 + 0) / 3
    assert metrics.macro_f1([0, 1], [0, 1], labels=[0, 1, 2]) == pytest.approx(2 / 3)


def test_matthews_binary_by_hand():
    golds = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 1, 0, 0, 0, 1, 0, 1]
    # TP = 3 (pos 0,1,7), TN = 3 (pos 3,4,6), FP = 1 (pos 5), FN = 1 (pos 2)
    # MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (9 − 1) / sqrt(4·4·4·4) = 8/16 = 0.5
    assert metrics.matthews_corrcoef(golds, preds) == pytest.approx(0.5)


def test_matthews_extremes():
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    # a constant prediction makes a factor under the root 0 -> 0 by convention
    assert metrics.matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


def test_multirc_f1a_and_em():
    # question a: 3 options, question b: 2 options
    golds = [1, 0, 1, 1, 0]
    preds = [1, 0, 0, 1, 0]
    questions = ["a", "a", "a", "b", "b"]
    # F1a over all options, positive class 1: TP 2 (pos 0,3), FP 0, FN 1 (pos 2) -> 4/(4+0+1) = 0.8
    # EM: question a has a wrong option (pos 2) -> 0; question b all right -> 1; mean = 0.5
    scores = metrics.multirc_scores(golds, preds, questions)
    assert scores["f1a"] == pytest.approx(0.8)
    assert scores["em"] == pytest.approx(0.5)


def test_normalize_answer_squad_style():
    # lower, drop punctuation, drop articles, squeeze whitespace
    assert metrics.normalize_answer("  The U.S.  Army's  ") == "us armys"
    assert metrics.normalize_answer("An apple, a pear") == "apple pear"
    # "the" inside a word stays
    assert metrics.normalize_answer("Theresa") == "theresa"


def test_record_token_f1_and_em():
    # "Barack Obama" vs "Obama": common 1 token; precision 1/2, recall 1/1 -> F1 = 2·0.5·1/1.5 = 2/3
    assert metrics.token_f1("Barack Obama", "Obama") == pytest.approx(2 / 3)
    assert metrics.exact_match("the United States.", "United States") == 1.0
    assert metrics.token_f1("China", "Obama") == 0.0


def test_record_scores_take_max_over_answers_then_mean_over_queries():
    predictions = ["Barack Obama", "China"]
    golds = [["Obama", "Barack Obama"], ["United States", "U.S."]]
    # query 1: max F1 over golds = max(2/3, 1) = 1, max EM = 1; query 2: F1 0, EM 0
    # F1 = (1 + 0)/2 = 0.5 ; EM = (1 + 0)/2 = 0.5
    scores = metrics.record_scores(predictions, golds)
    assert scores == {"f1": pytest.approx(0.5), "em": pytest.approx(0.5)}
    # prediction "Obama" against ["Barack Obama"] only: F1 = 2/3 (P 1, R 1/2), EM 0
    assert metrics.record_scores(["Obama"], [["Barack Obama"]]) == {"f1": pytest.approx(2 / 3), "em": 0.0}


def test_record_scores_need_gold_answers():
    with pytest.raises(ValueError, match="no gold answers"):
        metrics.record_scores(["x"], [[]])


def test_gender_parity():
    # pairs 7: (1, 1) same; 8: (0, 1) differ; 9: (0, 0) same -> 2/3
    assert metrics.gender_parity([1, 1, 0, 1, 0, 0], [7, 7, 8, 8, 9, 9]) == pytest.approx(2 / 3)


def test_superglue_score_reproduces_the_paper_average():
    # DeBERTa 1.5B + SiFT, paper Table 5 (spec 6.2). Two-metric tasks are averaged first:
    # CB (94.9+97.2)/2 = 96.05, MultiRC (88.2+63.7)/2 = 75.95, ReCoRD (94.5+94.1)/2 = 94.3
    # sum = 90.4 + 96.05 + 96.8 + 75.95 + 94.3 + 93.2 + 76.4 + 95.9 = 719.0 ; / 8 = 89.875
    scores = {
        "BoolQ": 90.4, "CB": metrics.mean_score([94.9, 97.2]), "COPA": 96.8,
        "MultiRC": metrics.mean_score([88.2, 63.7]), "ReCoRD": metrics.mean_score([94.5, 94.1]),
        "RTE": 93.2, "WiC": 76.4, "WSC": 95.9,
        "AX-b": -1.0,  # diagnostics are not part of the average
    }
    assert metrics.superglue_score(scores) == pytest.approx(89.875)


def test_superglue_score_needs_all_eight_tasks():
    with pytest.raises(ValueError, match="missing WSC"):
        metrics.superglue_score({name: 1.0 for name in metrics.SUPERGLUE_TASKS if name != "WSC"})


def test_f1_for_class_with_nothing_predicted_or_gold_is_zero():
    assert metrics.f1_for_class([0, 0], [0, 0], positive=1) == 0.0
    assert not math.isnan(metrics.matthews_corrcoef([1, 1], [1, 1]))
