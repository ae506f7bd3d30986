# A team of ~200 engineers: ~300 completions each per working hour, busiest hour 3x the day's mean.
# python cost_calculator.py config/cost_example.py --bench=bench/results/serving_h100.json
requests_per_day = 500_000
peak_to_mean = 3.0
p95_slo_ms = 300.0  # an inline completion later than this feels slow in the editor
target_utilization = 0.7
min_replicas = 2
gpu = "H100"
