{% extends "v2.5/fmoec_moe.py" %}
