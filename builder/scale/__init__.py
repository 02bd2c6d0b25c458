"""Reference-scale measurements (make bench-scale): each module measures one part of issue 14."""
