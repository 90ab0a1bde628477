"""Size and range limits of the wire protocol, enforced by decode and by every constructor.

They keep one record under Kafka's default `max.message.bytes` (1 MiB) and make a hostile or
buggy producer cost a bounded amount. Lengths of text are in Unicode code points.
"""

from __future__ import annotations

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

MAX_MESSAGE_BYTES = 1_048_576  # one encoded value; decode refuses anything larger
MAX_ID_CHARS = 128  # request_id, worker_id, tenant, decision_id
MAX_MODEL_CHARS = 200
MAX_TOPIC_CHARS = 249  # Kafka's own limit
MAX_PROMPT_CHARS = 131_072  # text prompt; 4 bytes/char worst case still fits 1 MiB
MAX_PROMPT_TOKENS = 32_768  # prompt_token_ids
MAX_TOKEN_ID = INT32_MAX  # token ids fit a Java int
MAX_NEW_TOKENS = 16_384  # ceiling of max_tokens
MAX_TOP_K = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # each stop string
MAX_CHUNK_TOKENS = 4_096  # token_ids of one chunk
MAX_CHUNK_CHARS = 65_536  # text of one chunk
MAX_ATTEMPTS = 64  # placement attempts of one request
MAX_IN_FLIGHT = 4_096  # request ids listed in one heartbeat
MAX_MAP_ENTRIES = 64  # inputs / attrs maps
MAX_MAP_KEY_CHARS = 64
MAX_MAP_STR_CHARS = 256  # string values inside inputs / attrs
MAX_NAME_CHARS = 64  # codes and names: error_code, span_name, policy
MAX_REASON_CHARS = 1_024  # error messages, reasons
MAX_PROBLEMS = 64  # field problems kept in a dead letter
MAX_DEAD_LETTER_VALUE_BYTES = 983_040  # 960 KiB: the dead letter itself still fits 1 MiB
