/* worker/input/wk_rowset.c - placeholder: being written. */
typedef int wk_rowset_placeholder;
