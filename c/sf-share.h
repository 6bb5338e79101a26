/* sf-share.h: the sf-share tool (sf-share.c), one of sf-tools.c's. */
#ifndef SF_SHARE_H
#define SF_SHARE_H

int share_main(int argc, char **argv);

#endif
