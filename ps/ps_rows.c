/* ps/ps_rows.c - placeholder: being written. */
typedef int ps_rows_placeholder;
