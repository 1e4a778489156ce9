"""Stable Diffusion WebUI images: one instance's client, the cross-process instance pool and its provider.

client.py    SDClient, payloads, decoding (one WebUI instance)
planner.py   the pure assignment planning every pool process computes alike
queue.py     the shared queue (sd_waiters), this process's entries, tickets, leases
handover.py  hand-over of a finished caller's instance, UDP hints, pool members
health.py    instance health, probes, status (sd_instances)
pool.py      SDInstancePool, composed of the above
provider.py  SDPoolProvider, the ImageProvider over the pool (with SAM cut-outs)
"""
