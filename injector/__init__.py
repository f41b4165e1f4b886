"""Sidecar injection: the mutation (``mutate``), the admission webhook that applies it to pods as they are
created (``webhook``) and the webhook's serving certificate (``certs``). ``meshctl inject`` applies the same
mutation offline to manifests.
"""
