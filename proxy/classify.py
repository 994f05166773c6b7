"""Which statements may run on a replica: a bounded, total and conservative classifier.

A statement goes to a replica only when it provably cannot change, lock or depend on anything
the session's primary connection alone has: anything uncertain goes to the primary. The rules
are data (`FIRST_WORDS`, `DENIED_WORDS`, `DENIED_CALLS`, `BUILTIN_CALLS`) and each says which
hazard it covers; the hazards are those MaxScale's readwritesplit documents, plus MariaDB's own
(sequences, `SELECT ... INTO`, functions whose answer is per server):

- writes and DDL: only a text whose first word is SELECT, WITH or `(` can qualify;
- several statements in one text (`;` before its end): the rest may write;
- locking reads: `FOR UPDATE`, `LOCK IN SHARE MODE` (the words UPDATE and LOCK);
- `SELECT ... INTO @var / OUTFILE / DUMPFILE`: the word INTO;
- user variables (`@name`: read or assigned, they live on the primary's connection) and
  system variables (`@@...`: `@@last_insert_id`, `@@warning_count` are per connection);
- sequences: NEXTVAL(), LASTVAL(), SETVAL(), NEXT/PREVIOUS VALUE FOR;
- functions that write or whose answer is the primary connection's: stored functions and
  UDFs (any call not in `BUILTIN_CALLS`, and any `schema.name(...)`), GET_LOCK and the lock
  functions, LAST_INSERT_ID(), FOUND_ROWS() and SQL_CALC_FOUND_ROWS (a pair that must run on
  one connection), ROW_COUNT(), CONNECTION_ID(), MASTER_GTID_WAIT(), LOAD_FILE();
- executable comments (`/*! ... */`, `/*M! ... */`): they may hold anything;
- unterminated literals or comments, texts longer than `MAX_TEXT`: not understood.

`SHOW WARNINGS`, `SHOW ERRORS` and reads of `@@warning_count` / `@@error_count` are about the
previous statement: `about_previous` names them, and they run where it ran, a replica too.

Temporary tables, transactions and autocommit off are the session's state, not the text's:
`session_allows_replica` (proxy/readroute.py) checks them per command. Prepared statements are
classified once, at prepare time, by the same function; plain queries through a cache by text
(`Classifier`), bounded in entries and in the length of the texts it keeps.
"""

from __future__ import annotations

import enum
import re


class Verdict(enum.StrEnum):
    """Where a statement may run, with the reason it may not run on a replica."""

    REPLICA = "replica"
    NOT_A_READ = "not_a_read"  # the first word is not SELECT/WITH/(
    MULTI_STATEMENT = "multi_statement"
    LOCKING = "locking"  # FOR UPDATE, LOCK IN SHARE MODE
    INTO = "into"  # SELECT ... INTO
    VARIABLES = "variables"  # @user or @@system variables
    SEQUENCE = "sequence"
    FUNCTION = "function"  # a stored function, UDF or connection-bound built-in
    EXECUTABLE_COMMENT = "executable_comment"
    SYSTEM_SCHEMA = "system_schema"  # per-server tables (processlist, status, ...)
    UNPARSED = "unparsed"  # too long, unterminated: not understood

    @property
    def replica(self) -> bool:
        return self is Verdict.REPLICA


MAX_TEXT = 16384  # bytes: longer statements are not scanned (they go to the primary)

# Statements that may qualify start with these words (lower case).
FIRST_WORDS = frozenset({b"select", b"with"})
# Words that anywhere outside literals make a read unfit for a replica, and why.
DENIED_WORDS: dict[bytes, Verdict] = {
    b"update": Verdict.LOCKING,  # FOR UPDATE
    b"lock": Verdict.LOCKING,  # LOCK IN SHARE MODE
    b"into": Verdict.INTO,
    b"next": Verdict.SEQUENCE,  # NEXT VALUE FOR
    b"previous": Verdict.SEQUENCE,  # PREVIOUS VALUE FOR
    b"sql_calc_found_rows": Verdict.FUNCTION,
    b"procedure": Verdict.FUNCTION,  # SELECT ... PROCEDURE ANALYSE()
    b"information_schema": Verdict.SYSTEM_SCHEMA,
    b"performance_schema": Verdict.SYSTEM_SCHEMA,
    b"mysql": Verdict.SYSTEM_SCHEMA,
    b"sys": Verdict.SYSTEM_SCHEMA,
}
# Built-in functions whose call makes a read unfit: they write, lock, or answer for the
# connection or server they run on.
DENIED_CALLS: dict[bytes, Verdict] = {
    b"nextval": Verdict.SEQUENCE,
    b"lastval": Verdict.SEQUENCE,
    b"setval": Verdict.SEQUENCE,
    **dict.fromkeys(
        (
            b"get_lock",
            b"release_lock",
            b"release_all_locks",
            b"is_used_lock",
            b"is_free_lock",
            b"last_insert_id",
            b"found_rows",
            b"row_count",
            b"connection_id",
            b"master_gtid_wait",
            b"master_pos_wait",
            b"load_file",
            b"sleep",  # harmless, but a client sleeping expects its own connection
        ),
        Verdict.FUNCTION,
    ),
}
# Names that may be followed by `(` without being a call of a stored function or UDF: SQL
# keywords and MariaDB's built-in functions that read nothing but their arguments and tables.
BUILTIN_CALLS = frozenset(
    b"""
    select with as in exists not and or xor on from where join using over partition values
    interval case when then else any all some distinct between like is by having union limit
    offset cast convert char binary row rows window filter
    count sum avg min max group_concat bit_and bit_or bit_xor std stddev stddev_pop
    stddev_samp var_pop var_samp variance json_arrayagg json_objectagg
    row_number rank dense_rank ntile lag lead first_value last_value nth_value cume_dist
    percent_rank percentile_cont percentile_disc median
    abs ceil ceiling floor round truncate mod pow power sqrt exp ln log log2 log10 sign pi
    rand greatest least sin cos tan asin acos atan atan2 cot degrees radians crc32 conv
    concat concat_ws length char_length character_length octet_length lower upper lcase
    ucase substring substr substring_index left right trim ltrim rtrim lpad rpad replace
    reverse repeat space locate position instr field find_in_set elt format hex unhex
    ascii ord bin oct quote soundex strcmp insert md5 sha1 sha sha2 to_base64 from_base64
    regexp_replace regexp_substr regexp_instr weight_string collation charset coercibility
    if ifnull nullif coalesce isnull nvl nvl2 decode_oracle
    now current_timestamp localtime localtimestamp sysdate curdate current_date curtime
    current_time utc_date utc_time utc_timestamp unix_timestamp from_unixtime date time
    timestamp year month day dayofmonth dayofweek dayofyear dayname monthname week weekday
    weekofyear yearweek hour minute second microsecond quarter last_day makedate maketime
    date_add date_sub adddate subdate addtime subtime datediff timediff timestampadd
    timestampdiff date_format time_format str_to_date extract to_days from_days to_seconds
    sec_to_time time_to_sec convert_tz period_add period_diff get_format
    json_extract json_unquote json_value json_query json_object json_array json_contains
    json_contains_path json_keys json_length json_valid json_type json_search json_merge
    json_set json_insert json_replace json_remove json_quote json_compact json_detailed
    json_table json_exists json_depth json_array_append json_array_insert
    uuid uuid_short inet_aton inet_ntoa inet6_aton inet6_ntoa is_ipv4 is_ipv6
    user current_user session_user system_user database schema version
    """.split()
)

# One token per match: literals and comments are skipped whole; a word with what follows it
# (a `(`: a call, a `.`: a schema part); `@`, `;`, and the start of an unterminated literal.
_TOKEN = re.compile(
    rb"""(?sx)
      '(?:[^'\\]|\\.|'')*'
    | "(?:[^"\\]|\\.|"")*"
    | `(?:[^`]|``)*`
    | /\*[!M].*?\*/ (?P<exec>)
    | /\*.*?\*/
    | (?:--[ \t\r\n]|\#)[^\n]*
    | [0-9][0-9A-Za-z_.$]*
    | (?P<word>[A-Za-z_$\x80-\xff][0-9A-Za-z_$\x80-\xff]*)\s*(?P<next>[(.])?
    | (?P<at>@)
    | (?P<semi>;)
    | (?P<open>['"`]|/\*)
    """
)
_WORD_START = re.compile(rb"(?s)(?:\s+|\(|/\*(?![!M]).*?\*/|(?:--[ \t\r\n]|#)[^\n]*)*")
_FIRST = re.compile(rb"[A-Za-z_$\x80-\xff][0-9A-Za-z_$\x80-\xff]*")
_TAIL = b" \t\r\n;"


def classify(sql: bytes, start: int = 0) -> Verdict:
    """May the statement in `sql[start:]` run on a replica? Total: every input is a verdict."""
    if len(sql) - start > MAX_TEXT:
        return Verdict.UNPARSED
    end = len(sql)
    while end > start and sql[end - 1] in _TAIL:
        end -= 1
    m = _WORD_START.match(sql, start)
    first = m.end() if m else start
    w = _FIRST.match(sql, first)
    if w is None or w.group().lower() not in FIRST_WORDS:
        return Verdict.NOT_A_READ
    previous_dot = False
    for t in _TOKEN.finditer(sql, first, end):
        if t.group("exec") is not None:
            return Verdict.EXECUTABLE_COMMENT
        name = t.group("word")
        if name is not None:
            lower = name.lower()
            denied = DENIED_WORDS.get(lower)
            if denied is not None and not previous_dot:
                return denied
            call = t.group("next")
            if call == b"(":
                if previous_dot:
                    return Verdict.FUNCTION  # schema.function(...): a stored function
                denied = DENIED_CALLS.get(lower)
                if denied is not None:
                    return denied
                if lower not in BUILTIN_CALLS:
                    return Verdict.FUNCTION
            previous_dot = call == b"."
            continue
        previous_dot = False
        if t.group("at") is not None:
            return Verdict.VARIABLES
        if t.group("semi") is not None:
            return Verdict.MULTI_STATEMENT
        if t.group("open") is not None:
            return Verdict.UNPARSED
    return Verdict.REPLICA


# Statements about the previous statement (its warnings, errors and their counts): they must
# run where that statement ran, a replica too (MaxScale routes them to the last server used).
_ABOUT_PREVIOUS = re.compile(
    rb"(?is)\s*(?:show\s+(?:count\s*\(\s*\*\s*\)\s+)?(?:warnings|errors)(?:\s+limit\s+\d{1,20}"
    rb"(?:\s*,\s*\d{1,20})?)?|select\s+@@(?:session\.)?(?:warning_count|error_count))\s*;?\s*"
)


def about_previous(sql: bytes, start: int = 0) -> bool:
    """Is this SHOW WARNINGS, SHOW ERRORS, their COUNT(*), or a read of @@warning_count or
    @@error_count, and nothing else? (Bounded: the pattern has no nested repetition.)"""
    return len(sql) - start <= 256 and _ABOUT_PREVIOUS.fullmatch(sql, start) is not None


class Classifier:
    """`classify` behind a cache by text: at most `entries` texts of at most `longest` bytes
    each, so its memory is bounded whatever clients send; the oldest entry goes first."""

    def __init__(self, entries: int = 4096, longest: int = 1024) -> None:
        self.entries = entries
        self.longest = longest
        self._cache: dict[bytes, Verdict] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def __call__(self, sql: bytes, start: int = 0) -> Verdict:
        if len(sql) - start > self.longest:
            return classify(sql, start)
        key = sql[start:] if start else sql
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = classify(key)
            cache = self._cache
            if len(cache) >= self.entries:
                del cache[next(iter(cache))]
            cache[key] = verdict
        return verdict
