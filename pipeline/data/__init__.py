"""Record contracts, file IO with validation, Ray Data streaming."""

from pipeline.data.io import ReadReport, list_shards, read_file, read_records, write_records
from pipeline.data.records import RecordError, validate_rows
from pipeline.data.schemas import ROW_MODELS, SCHEMAS, schema_for

__all__ = [
    "ROW_MODELS", "SCHEMAS", "ReadReport", "RecordError", "list_shards", "read_file",
    "read_records", "schema_for", "validate_rows", "write_records",
]
