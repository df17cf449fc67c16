"""Variable-length code files (stage 2 output, stage 3 input): Arrow IPC parts + manifest.

    from data.codes import CodeWriter, CodeReader, CodeManifest, verify_codes, TokenBudgetBatcher

See format.py for the file layout, manifest.py for completeness and locking, order.py for the
epoch order and rank-sharding rule shared by CodeIterator and TokenBudgetBatcher.
"""
from data.codes.format import code_dtype, code_schema, part_file_name, sequence_lengths
from data.codes.manifest import CodeManifest, ManifestMismatchError
from data.codes.reader import CodeBatch, CodeReader, CodeRecord
from data.codes.order import CodeIterator, TokenBudgetBatcher, pack_by_token_budget, rank_positions
from data.codes.synthetic import write_corpus
from data.codes.verify import VerifyReport, code_stats, verify_codes
from data.codes.writer import CodeWriter

__all__ = ["CodeWriter", "CodeReader", "CodeRecord", "CodeBatch", "CodeManifest", "ManifestMismatchError",
           "CodeIterator", "TokenBudgetBatcher", "VerifyReport", "verify_codes", "code_stats", "code_dtype",
           "code_schema", "part_file_name", "sequence_lengths", "pack_by_token_budget", "rank_positions",
           "write_corpus"]
