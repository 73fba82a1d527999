"""Data plumbing shared by every model and dataset: the conversation schema (:mod:`nvlcore.data.schema`)
and helpers for dataset makers (:mod:`nvlcore.data.makers`)."""
