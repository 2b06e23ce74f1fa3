# The gates, from fmoec's one definition of each (`fmoec::gates`: the class, the experts per token
# it routes, None for any top_k) with the defaults of their arguments from `std.gates`.
_GATES = {
{%- for g in v.gates %}
    '{{ g.name }}': dict(cls='{{ g.class }}', top_k={{ g.top_k }}, capacity={{ g.capacity }}, balance_loss={{ g.balance_loss }},
        jitter={{ g.jitter }}, random_routing={{ g.random_routing }}),
{%- endfor %}
}
# Whether the model's linear layers, the gates' included, have biases.
_FMOEC_BIAS = {{ v.bias }}
