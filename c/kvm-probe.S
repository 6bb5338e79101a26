/* A functional KVM probe: a 64 KiB BIOS image that takes the CPU from reset
 * through protected mode and 4-level paging into 64-bit long mode, then writes
 * 0x2a to the isa-debug-exit port, so QEMU exits with status (0x2a << 1) | 1 = 85.
 * Some hosts expose a /dev/kvm that runs real-mode code but hangs entering long
 * mode (as a Linux kernel does while decompressing): only a run this far tells. */
        .set BASE, 0xffff0000
        .set PML4, 0x1000
        .set PDPT, 0x2000
        .set PD, 0x3000

        .code16
        .text
        .globl _start
_start:
        cli
        lgdtl %cs:(gdtr - BASE)
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $0x08, $pm32

        .code32
pm32:
        movw $0x18, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        /* PML4[0] -> PDPT; PDPT[3] -> PD; PD[511] = 2 MiB page at 0xffe00000. */
        xorl %eax, %eax
        movl $PML4, %edi
        movl $(3 * 4096 / 4), %ecx
        rep stosl
        movl $(PDPT | 3), PML4
        movl $(PD | 3), PDPT + 3 * 8
        movl $(0xffe00000 | 0x83), PD + 511 * 8
        movl %cr4, %eax
        orl $(1 << 5), %eax             /* PAE */
        movl %eax, %cr4
        movl $PML4, %eax
        movl %eax, %cr3
        movl $0xc0000080, %ecx          /* EFER */
        rdmsr
        orl $(1 << 8), %eax             /* LME */
        wrmsr
        movl %cr0, %eax
        orl $(1 << 31), %eax            /* PG */
        movl %eax, %cr0
        ljmpl $0x10, $lm64

        .code64
lm64:
        movb $0x2a, %al
        outb %al, $0xf4
1:      hlt
        jmp 1b

        .p2align 3
gdt:
        .quad 0
        .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code */
        .quad 0x00af9a000000ffff        /* 0x10: 64-bit code */
        .quad 0x00cf92000000ffff        /* 0x18: data */
gdtr:
        .word gdtr - gdt - 1
        .long gdt

        .org 0xfff0                     /* the reset vector */
        .code16
        jmp _start
        .org 0x10000
