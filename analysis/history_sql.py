"""The SQL of ``slotscope history``, in one place (DuckDB dialect).

Every query reads the dataset in place (read_parquet over its glob, hive
partitions host/kernel/scenario/year from the path) and starts from NIGHTS:
one value per night per host x kernel x scenario.  A night's scenario
figure is the same on each of its repetitions' rows, and a file and its
compaction may both be visible for a moment, so GROUP BY night_id with
any_value() both picks that one value and drops duplicates.

``{source}``, ``{where}`` and ``{figure}`` are filled in by
analysis/history.py: the figure from a fixed list of column names, the
where clause from fixed fragments; every value is a $parameter.
``{kernel_line}`` is the column of that name, or NULL in a dataset whose
files all predate it (version 1).
"""

SOURCE = """read_parquet({glob}, hive_partitioning = true, union_by_name = true,
    hive_types = {{'host': VARCHAR, 'kernel': VARCHAR, 'scenario': VARCHAR, 'year': INTEGER}})"""

# Filters on partition columns prune whole directories before any file opens.
FILTERS = {
    "host": "host = $host",
    "kernel": "kernel = $kernel",
    "scenario": "scenario = $scenario",
    "since": "date >= CAST($since AS DATE) AND year >= year(CAST($since AS DATE))",
    "until": "date <= CAST($until AS DATE) AND year <= year(CAST($until AS DATE))",
}

NIGHTS = """
SELECT host, kernel, scenario, night_id,
       any_value(date)          AS date,
       any_value(finished_wall) AS finished_wall,
       any_value(qemu)          AS qemu,
       coalesce(any_value({kernel_line}), '') AS kernel_line,
       any_value({figure})      AS value
FROM {source}
WHERE {where}
GROUP BY host, kernel, scenario, night_id
"""

# A figure per scenario x host x kernel and period: the median of its nights.
TREND = """
WITH nights AS ({nights})
SELECT scenario, host, kernel,
       CAST(date_trunc($every, date) AS DATE) AS period,
       count(*)     AS nights,
       median(value) AS value,
       min(value)   AS low,
       max(value)   AS high
FROM nights
WHERE value IS NOT NULL
GROUP BY ALL
ORDER BY scenario, host, kernel, period
"""

# Kernel A's and B's nightly values per scenario (the bootstrap resamples them).
COMPARE = """
WITH nights AS ({nights})
SELECT scenario, kernel, list(value ORDER BY finished_wall) AS values
FROM nights
WHERE value IS NOT NULL AND kernel IN ($a, $b)
GROUP BY scenario, kernel
ORDER BY scenario, kernel
"""

# Each host x scenario x kernel line series in night order, across kernel
# and QEMU upgrades: a change is found where it happened, whatever changed.
# A line is the lab's kernel axis entry ("6.12"), so the kernels a night
# runs side by side stay apart; nights from before the axis ('') make one.
SERIES = """
WITH nights AS ({nights})
SELECT host, scenario, kernel_line,
       list(value      ORDER BY finished_wall) AS values,
       list(date       ORDER BY finished_wall) AS dates,
       list(kernel     ORDER BY finished_wall) AS kernels,
       list(qemu       ORDER BY finished_wall) AS qemus
FROM nights
WHERE value IS NOT NULL
GROUP BY host, scenario, kernel_line
ORDER BY host, scenario, kernel_line
"""
