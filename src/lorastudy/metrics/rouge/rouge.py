"""ROUGE as an `evaluate` module, computed by Google's rouge-score package.

`evaluate.load("rouge")` fetches its script from the Hugging Face Hub at run
time: unpinned, and impossible offline. This module has the same interface
(`rouge_types`, `use_aggregator`, `use_stemmer`, `tokenizer`) and is loaded
from this package's directory, so the study's numbers do not depend on what
the Hub serves on the day.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer, scoring

_DESCRIPTION = "ROUGE-N and ROUGE-L F-measures (rouge-score's implementation of ROUGE-1.5.5)."
_KWARGS = """
Args:
    predictions: list of predicted texts.
    references: list of reference texts.
    rouge_types: which of rouge1, rouge2, ..., rougeL, rougeLsum to compute.
    use_aggregator: return rouge-score's bootstrap-aggregated mid F-measure (True) or one value per example (False).
    use_stemmer: apply the Porter stemmer to words before matching.
    tokenizer: an object with a `tokenize(text)` method, replacing rouge-score's default tokenizer.
Returns:
    a dict of ROUGE type to F-measure (or list of per-example F-measures).
"""
_CITATION = """@inproceedings{lin-2004-rouge,
  title = "ROUGE: A Package for Automatic Evaluation of Summaries",
  author = "Lin, Chin-Yew",
  booktitle = "Text Summarization Branches Out",
  year = "2004",
  pages = "74--81",
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("string", id="sequence"), "references": datasets.Value("string", id="sequence")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=False, tokenizer=None):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
        scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
        if use_aggregator:
            aggregator = scoring.BootstrapAggregator()
            for score in scores:
                aggregator.add_scores(score)
            result = aggregator.aggregate()
            return {key: result[key].mid.fmeasure for key in rouge_types}
        return {key: [score[key].fmeasure for score in scores] for key in rouge_types}
