"""Delivery on Kubernetes: images, the generated Argo WorkflowTemplate, single-step Jobs, submission.

Everything here is derived from the pipeline definition (`m3tune.pipeline`):
a step added there appears in the rendered template after a re-render
(`m3tune render argo --output argo/`, or `make render`).
"""
