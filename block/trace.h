#include "trace/trace-block_extlock.h"
