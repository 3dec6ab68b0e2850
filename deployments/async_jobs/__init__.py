"""HTTP async generation jobs (POST /v1/images/jobs), not the offline Ray Data job (jobs/): the jobs run by
the ingress replica that took them (jobs), where their records and events live (store: memory or Redis), and
their webhooks (webhooks)."""
