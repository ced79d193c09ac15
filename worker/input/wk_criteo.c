/* worker/input/wk_criteo.c - placeholder: being written. */
typedef int wk_criteo_placeholder;
