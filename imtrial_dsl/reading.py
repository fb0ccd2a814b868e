"""The vocabulary of ``read`` blocks: response criteria, read paradigms, adjudication triggers, blinding
fields and reader-variability metrics. Read by the checker (``check/reads.py``) and the charter."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Criteria:
    title: str
    reference: str
    modalities: tuple[str, ...]   # where the criteria are defined; another modality gets W430


CRITERIA = {
    "recist_1_1": Criteria("RECIST 1.1", "Eisenhauer EA et al. New response evaluation criteria in solid tumours: "
                           "revised RECIST guideline (version 1.1). Eur J Cancer 2009;45:228-247", ("CT", "MR")),
    "irecist": Criteria("iRECIST", "Seymour L et al. iRECIST: guidelines for response criteria for use in trials "
                        "testing immunotherapeutics. Lancet Oncol 2017;18:e143-e152", ("CT", "MR")),
    "rano": Criteria("RANO", "Wen PY et al. Updated response assessment criteria for high-grade gliomas: Response "
                     "Assessment in Neuro-Oncology working group. J Clin Oncol 2010;28:1963-1972", ("MR",)),
    "lugano": Criteria("Lugano classification", "Cheson BD et al. Recommendations for initial evaluation, staging, and "
                       "response assessment of Hodgkin and non-Hodgkin lymphoma: the Lugano classification. "
                       "J Clin Oncol 2014;32:3059-3068", ("PT", "CT")),
    "custom": Criteria("custom criteria", "", ()),
}


@dataclass(frozen=True)
class Paradigm:
    text: str
    min_readers: int
    adjudicators: bool   # the paradigm has an adjudicator (and 'adjudicate when' applies)


PARADIGMS = {
    "single_reader": Paradigm("one reader reads every time point", 1, False),
    "independent_with_adjudication": Paradigm(
        "independent readers read every time point without seeing each other's results; when their reads disagree "
        "as stated below, an adjudicator reviews both reads and selects the one that stands", 2, True),
    "consensus": Paradigm("readers read together and record one consensus result", 2, False),
    "majority": Paradigm("independent readers read every time point; the result that most readers give stands", 3, False),
}

TRIGGERS = {
    "response_differs": "the time-point response differs between the readers",
    "best_response_differs": "the best overall response differs",
    "progression_differs": "one reader finds progression and the other does not",
    "progression_date_differs": "the date of progression differs",
    "new_lesion_differs": "one reader finds a new lesion and the other does not",
    "measurement_differs": "a measurement differs by more than the rule below",
}

BLINDING = {
    "arm": "the treatment arm",
    "site": "the site and the participant's identity",
    "timepoint": "the time point (examinations are presented in random order)",
    "visit_date": "the examination dates",
    "clinical_data": "clinical data (laboratory results, clinical outcomes)",
    "other_readers": "the other readers' results",
    "local_reads": "the sites' own reads",
}

# metric -> (what it measures, bound direction: "min" = agreement must stay at least the threshold)
VARIABILITY = {
    "kappa": ("Cohen's kappa of the readers' categorical results", "min"),
    "weighted_kappa": ("weighted kappa of the readers' ordinal results", "min"),
    "icc": ("intraclass correlation coefficient of the readers' measurements", "min"),
    "agreement": ("fraction of time points on which the readers agree", "min"),
    "adjudication_rate": ("fraction of time points that need adjudication", "max"),
}
