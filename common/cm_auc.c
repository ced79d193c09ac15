/* common/cm_auc.c - placeholder: being written. */
typedef int cm_auc_placeholder;
