"""The CoreDNS lab: a real fleet under real DNS load, with scripted faults, recorded as labelled data.

`lab/run SCENARIO.yaml --out DIR` runs a scenario (see lab/scenarios/ and data/README.md).
"""
