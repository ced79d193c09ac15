/* tools/ctr_planted.c - placeholder: being written. */
typedef int ctr_planted_placeholder;
