"""One vocabulary of labels across sources: "COVID", "Normal", or the finding itself.

Publishers spell the same class many ways (COVID-19, covid, positive; No Finding, No_Finding,
normal, negative). The binary task only needs COVID vs the rest, but other findings keep their
own name so reports can show what the negatives are made of.
"""

from __future__ import annotations

import re

COVID = "COVID"
NORMAL = "Normal"

_SYNONYMS = {
    "covid": COVID,
    "covid-19": COVID,
    "covid19": COVID,
    "covid 19": COVID,
    "sars-cov-2": COVID,
    "positive": COVID,
    "normal": NORMAL,
    "no finding": NORMAL,
    "negative": NORMAL,
    "pneumonia": "Pneumonia",
    "lung nodule": "Lung nodule",
}


def normalise_label(text: str) -> str:
    """Map a class name case-insensitively; unknown names are kept (trimmed) as their own class.

    Returns "" for a blank label so callers can exclude the row with a reason.
    """
    cleaned = re.sub(r"[\s_]+", " ", text).strip()
    return _SYNONYMS.get(cleaned.lower(), cleaned)


def finding_label(finding: str) -> str:
    """Label for a free-text finding such as ieee8023's "COVID-19, ARDS" or "Pneumonia/Viral/SARS".

    Any mention of COVID-19 makes the image COVID; a hierarchical finding keeps its most specific
    part ("Pneumonia/Viral/SARS" -> "SARS"), matching the flat names of the June-2020 snapshot.
    """
    if re.search(r"covid[-\s_]?19|sars-cov-2", finding, re.IGNORECASE):
        return COVID
    leaf = finding.strip().strip("/").rsplit("/", 1)[-1]
    return normalise_label(leaf)
