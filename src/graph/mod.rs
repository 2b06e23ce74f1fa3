//! `graph`: the ModelGraph (ops, shapes, parameters and FLOPs per node) lowered from the
//! checked model.
